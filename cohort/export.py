"""Plain single-network model files: {arch, num_classes, in_channels, model, ...extras}.

ONE's best_student.pt, each KD/TAKD stage's model.pt and any teacher given to `cohort kd`
use this format; `model` loads strictly into `build_model(arch, num_classes, in_channels)`.
A cohort student's checkpoint ({arch, index, model, optimizer}) is accepted as a teacher too:
the number of classes and channels then come from the dataset.
"""
from __future__ import annotations

from torch import nn

from .errors import CheckpointError
from .models import MODEL_NAMES, build_model
from .runs import load_checkpoint_file
from .storage import location, save_torch


def atomic_torch_save(obj, path) -> None:
    """torch.save of the whole file at once: locally a temporary file renamed into place, on
    an object store one upload (cohort.storage)."""
    save_torch(obj, path)


def save_plain_model(path, arch: str, num_classes: int, in_channels: int, state: dict,
                     **extras) -> None:
    state = {k: v.detach().cpu() for k, v in state.items()}
    atomic_torch_save({"arch": arch, "num_classes": num_classes, "in_channels": in_channels,
                       "model": state, **extras}, path)


def read_plain_model(path, num_classes: int, in_channels: int, flag: str) -> dict:
    """Load and check a model file; the payload with arch, num_classes, in_channels, model.
    Anything unusable raises CheckpointError naming `flag`."""
    path = location(path, flag)
    if not path.is_file():
        raise CheckpointError(f"{flag}: {path} is not a file")
    payload = load_checkpoint_file(path)
    if not isinstance(payload, dict) or "model" not in payload or payload.get("arch") not in MODEL_NAMES:
        raise CheckpointError(f"{flag}: {path} is not a cohort model file (needs arch and model)")
    payload = {**payload, "num_classes": payload.get("num_classes", num_classes),
               "in_channels": payload.get("in_channels", in_channels)}
    if (payload["num_classes"], payload["in_channels"]) != (num_classes, in_channels):
        raise CheckpointError(
            f"{flag}: {path} is a {payload['arch']} for {payload['num_classes']} classes and "
            f"{payload['in_channels']} channels; the dataset has {num_classes} and {in_channels}")
    instantiate(payload, flag, path)   # fails here, before any work, if the weights don't fit
    return payload


def instantiate(payload: dict, flag: str = "--teacher-checkpoint", path="model") -> nn.Module:
    model = build_model(payload["arch"], payload["num_classes"], payload["in_channels"])
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{flag}: the weights in {path} do not fit a {payload['arch']} ({first})") from None
    return model

"""Which device a student actor or a Ray Train worker trains on: what Ray assigned it.

Pure decisions (no Ray import): the callers in cohort.ray pass the GPU ids Ray assigned
(`ray.get_runtime_context().get_accelerator_ids()["GPU"]`) and CUDA_VISIBLE_DEVICES.
`torch.cuda.is_available()` never decides: Ray 2.60 no longer hides the GPUs from an actor
that asked for none, so on a GPU node every CPU actor would see (and use) GPU 0.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from .errors import UsageError

# Ray accepts fractional GPU amounts below 1 in steps of 1/10000 (its resource precision)
GPU_FRACTION_STEP = 10_000


def assigned_device(setting: str, gpu_ids: Sequence[str], visible: str | None) -> torch.device:
    """The torch device for `setting` (auto, cpu, cuda, cuda:N) given the GPU ids Ray assigned
    to this process and its CUDA_VISIBLE_DEVICES (`visible`, None when unset).

    No GPU assigned, or `cpu`: the CPU. Otherwise the assigned GPU as torch numbers it: Ray
    sets CUDA_VISIBLE_DEVICES to the assigned ids (Ray Train: to every id of the node's
    workers), so torch's index is the id's position in that list; with the variable unset
    torch sees every GPU and the index is the id itself. `cuda:N` picks the N-th assigned GPU.
    Several actors sharing a GPU (fractional GPUs) are assigned the same id: the shared GPU."""
    if setting == "cpu" or (setting == "auto" and not gpu_ids):
        return torch.device("cpu")
    if not gpu_ids:
        raise UsageError("--device", f"{setting} needs a GPU, but Ray assigned none to this "
                                     "process (give it GPUs, or pass --device auto)")
    nth = gpu_index(setting)
    ordinals = sorted(torch_ordinal(gpu_id, visible) for gpu_id in gpu_ids)
    if nth >= len(ordinals):
        raise UsageError("--device", f"{setting} asks for GPU {nth} of this process, but Ray "
                                     f"assigned it {len(ordinals)} (ids {', '.join(gpu_ids)})")
    return torch.device("cuda", ordinals[nth])


def gpu_index(setting: str) -> int:
    """N of cuda:N (0 for cuda and auto): which of its assigned GPUs a process trains on."""
    if setting == "auto":
        return 0
    match = re.fullmatch(r"cuda(?::(\d+))?", setting)
    if match is None:
        raise UsageError("--device", f"{setting!r} is not one of: auto, cpu, cuda, cuda:N")
    return int(match.group(1) or 0)


def torch_ordinal(gpu_id: str, visible: str | None) -> int:
    """torch's index of the GPU Ray calls `gpu_id`, given CUDA_VISIBLE_DEVICES."""
    if visible is not None:
        listed = [v.strip() for v in visible.split(",") if v.strip()]
        if str(gpu_id) in listed:
            return listed.index(str(gpu_id))
        raise RuntimeError(f"Ray assigned GPU {gpu_id}, which CUDA_VISIBLE_DEVICES={visible!r} "
                           "hides from this process")
    if not str(gpu_id).isdigit():   # a UUID: only CUDA_VISIBLE_DEVICES can map it to an index
        raise RuntimeError(f"Ray assigned GPU {gpu_id}, but CUDA_VISIBLE_DEVICES is unset, so "
                           "torch's index for it is unknown")
    return int(gpu_id)


def cpu_only_environment(device: torch.device) -> dict[str, str]:
    """Environment variables that keep a CPU process off every GPU: Ray leaves
    CUDA_VISIBLE_DEVICES alone for an actor that asked for no GPU, and a library touching
    CUDA would otherwise open a context on GPU 0 behind Ray's back. Empty for a GPU device."""
    return {"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {}


def check_gpu_amount(gpus: float, flag: str) -> None:
    """Ray takes a fraction of one GPU or a whole number of GPUs, nothing in between."""
    if gpus > 1 and gpus != int(gpus):
        raise UsageError(flag, f"more than one GPU must be a whole number (got {gpus:g}); "
                               "a fraction shares one GPU")


def require_gpus(device: str, gpus: float, flag: str) -> None:
    """--device cuda[:N] trains on the GPUs Ray assigns each process: refuse it, before
    anything starts, when each process gets none or fewer than N + 1."""
    if device in ("auto", "cpu"):
        return
    nth = gpu_index(device)
    if gpus <= 0:
        raise UsageError("--device", f"{device} trains on GPUs, but {flag} comes to 0 (given, or "
                                     "a cluster without GPUs); pass --device auto, or GPUs")
    if nth >= max(1, math.floor(gpus)):
        raise UsageError("--device", f"{device} names GPU {nth} of each process, but {flag} "
                                     f"{gpus:g} gives each {max(1, math.floor(gpus))}")


def may_share_gpu(gpus: float, device: str, ranks: int) -> bool:
    """Whether `ranks` processes of `gpus` GPUs each may land two on one GPU (a fraction
    below one, more than one rank, and not --device cpu): NCCL refuses that."""
    return ranks > 1 and 0 < gpus < 1 and device != "cpu"


def check_gpu_settings(cfg) -> None:
    """GPU settings that Ray or NCCL would refuse mid-start, refused before anything starts:
    a cohort's (--gpus-per-student, --exchange) or a Ray Train job's (--gpus-per-worker)."""
    if getattr(cfg, "runtime", "ray") != "ray":
        return
    if hasattr(cfg, "gpus_per_student"):
        check_gpu_amount(cfg.gpus_per_student, "--gpus-per-student")
        if cfg.exchange == "collective" and may_share_gpu(cfg.gpus_per_student, cfg.device,
                                                          cfg.students):
            raise UsageError("--exchange", "collective runs NCCL, which refuses two students on "
                                           f"one GPU, and --gpus-per-student {cfg.gpus_per_student:g} "
                                           "shares one; use --exchange store (fractional GPUs "
                                           "work there), whole GPUs, or --device cpu")
    if hasattr(cfg, "gpus_per_worker"):
        check_gpu_amount(cfg.gpus_per_worker, "--gpus-per-worker")
        if may_share_gpu(cfg.gpus_per_worker, cfg.device, cfg.workers):
            raise UsageError("--gpus-per-worker", f"{cfg.gpus_per_worker:g} lets {cfg.workers} "
                                                  "DDP ranks share a GPU, which NCCL refuses; use "
                                                  "whole GPUs, --workers 1, or --device cpu (gloo)")


def packed_gpus(gpus_available: float, units: int) -> float:
    """The largest per-unit GPU fraction that packs `units` on `gpus_available` GPUs."""
    return math.floor(GPU_FRACTION_STEP * gpus_available / units) / GPU_FRACTION_STEP

"""What every runtime shares: validation before anything starts, the data, the run
directory, the cohort's metric rows, checkpoints and the summary. Nothing here imports Ray."""
from __future__ import annotations

import json
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import losses
from ..config import JobConfig, validate, validate_against_data
from ..data import Dataset, load_dataset
from ..metrics import accuracy_and_loss, ensemble_metrics
from ..runs import RunDir, latest_checkpoint, read_checkpoint, summarize, write_json
from ..storage import read_parquet


def load_data(cfg: JobConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)


def prepare_run(cfg: JobConfig, dataset: Dataset | None = None) -> tuple[RunDir, Dataset]:
    """Validate everything, then load the data and plan the run directory (nothing written)."""
    validate(cfg)
    dataset = dataset if dataset is not None else load_data(cfg)
    validate_against_data(cfg, dataset)
    run = RunDir.plan(cfg.output, cfg.to_dict(), resume=cfg.resume, overwrite=cfg.overwrite)
    return run, dataset


def general_weights(val_logits: Sequence[torch.Tensor], val_labels: torch.Tensor) -> torch.Tensor:
    """KDCL-general ensemble weights from the members' held-out predictions."""
    return losses.kdcl_general_weights([F.softmax(z.float(), 1) for z in val_logits], val_labels)


def cohort_rows(cfg, epoch: int, lr: float, names: Sequence[str], train_stats: Sequence[dict],
                test_logits: Sequence[torch.Tensor], test_labels: torch.Tensor, epoch_seconds: float,
                val_logits: Sequence[torch.Tensor] | None = None,
                val_labels: torch.Tensor | None = None) -> list[dict]:
    """One metrics row per student plus the ensemble's (val_acc too when there is a split)."""
    rows = []
    for k, (name, stats, logits) in enumerate(zip(names, train_stats, test_logits)):
        acc, loss = accuracy_and_loss(logits, test_labels)
        rows.append({"method": cfg.method, "member": name, "epoch": epoch, "lr": lr,
                     "test_acc": acc, "test_loss": loss, "epoch_seconds": epoch_seconds, **stats})
        if val_logits is not None:
            rows[-1]["val_acc"] = accuracy_and_loss(val_logits[k], val_labels)[0]
    acc, loss = ensemble_metrics(test_logits, test_labels)
    rows.append({"method": cfg.method, "member": "ensemble", "epoch": epoch, "lr": lr,
                 "test_acc": acc, "test_loss": loss, "epoch_seconds": epoch_seconds})
    if val_logits is not None:
        rows[-1]["val_acc"] = ensemble_metrics(val_logits, val_labels)[0]
    return rows


def restore_point(run: RunDir) -> tuple[int, dict[str, dict]]:
    """(epochs completed, member states) of the run's latest checkpoint."""
    meta, states = read_checkpoint(latest_checkpoint(run.path))
    return meta["epochs_completed"], states


def should_checkpoint(cfg, epoch: int) -> bool:
    return (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs


def run_summary(run: RunDir) -> dict:
    return json.loads((run.path / "summary.json").read_text())


def write_summary(run: RunDir, cfg: JobConfig, extra: dict) -> dict:
    """summary.json from the run's metric rows, the restarts already recorded, and `extra`."""
    metrics = run.path / "metrics.parquet"
    rows = read_parquet(metrics).to_pylist() if metrics.exists() else []
    previous = run.path / "summary.json"
    if previous.exists():   # keep what a controller-side writer recorded (restarts)
        old = json.loads(previous.read_text())
        extra = {**{k: v for k, v in old.items() if k == "restarts"}, **extra}
    summary = {**summarize(rows, cfg.to_dict()), **extra}
    write_json(run.path / "summary.json", summary)
    return summary

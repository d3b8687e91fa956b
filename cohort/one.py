"""ONE (Lan, Zhu, Gong 2018) as one Ray Train DDP job: `cohort one` / `jobs/one.py`.

One network (`cohort.models.build_one`): a shared trunk, m branches and a gate. Every step
minimises `cohort.losses.one_loss`

    L = Σ_i CE(z_i, y) + CE(z_e, y) + λ(t) · Σ_i soft_kl(z_i, z_e, T),   z_e = Σ_i g_i z_i

with λ(t) ramped up as in the official code: λ(t) = kd_weight · exp(−5 (1 − t/T_r)²) for
epochs t < T_r (`--rampup-epochs`, 80 there), kd_weight afterwards; T_r = 0 turns the ramp
off. The training machinery (global batch split over N workers, synchronised BatchNorm, DDP,
checkpoints, resume, run directory) is `cohort.train_loop`; this module is the task.

Metrics per epoch (RUN/metrics.parquet): members branch0..branch{m-1}, `ensemble` (the
gated teacher z_e, the paper's E-ONE) and `average` (mean of the branches' softmax, the
ensemble DML and KDCL report). Branch rows carry `gate_weight`, the mean gate weight of that
branch on the test set (and `train_gate_weight` on the training batches); every row carries
`kd_weight`, the epoch's λ(t).

Deployment: the branch with the best test accuracy over all epochs is exported as a plain
single-branch network, RUN/best_student.pt = {arch, num_classes, in_channels, model, branch,
epoch, test_acc}, whose `model` loads strictly into `build_model(arch, num_classes,
in_channels)`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import check, choice, validate_against_data, validate_train_job
from .data import Dataset, derive_seed
from .export import atomic_torch_save
from .losses import one_ensemble_logits, one_loss, soft_kl
from .metrics import accuracy_and_loss, ensemble_metrics
from .models import MODEL_NAMES, build_one
from .student import INIT_STREAM, DataSpec
from .task import EpochContext, EvalSet, TrainJobConfig, TrainTask

OFFICIAL_RAMPUP_EPOCHS = 80


@dataclass
class OneConfig(TrainJobConfig):
    method: str = "one"
    arch: str = "resnet32"
    branches: int = 3
    epochs: int = 300
    batch_size: int = 128
    weight_decay: float = 5e-4
    temperature: float = 3.0
    kd_weight: float = 1.0
    rampup_epochs: int = OFFICIAL_RAMPUP_EPOCHS
    output: str = "runs/one"

    @property
    def member_names(self) -> list[str]:
        return [f"branch{i}" for i in range(self.branches)] + ["ensemble", "average"]


def rampup_weight(kd_weight: float, epoch: int, rampup_epochs: int) -> float:
    """λ(t) of the official ONE code: kd_weight · exp(−5 (1 − t/T_r)²) while t < T_r."""
    if rampup_epochs <= 0 or epoch >= rampup_epochs:
        return float(kd_weight)
    phase = 1.0 - epoch / rampup_epochs
    return float(kd_weight) * math.exp(-5.0 * phase * phase)


def validate_one(cfg: OneConfig) -> None:
    """Every check that needs no data; raises UsageError naming the flag."""
    choice(cfg.arch, MODEL_NAMES, "--arch")
    check(cfg.branches >= 2, "--branches", f"ONE needs at least 2 branches (got {cfg.branches})")
    validate_train_job(cfg)   # training numbers, workers, global batch split evenly over them
    check(cfg.rampup_epochs >= 0, "--rampup-epochs", f"must be >= 0 (got {cfg.rampup_epochs})")


class OneTask(TrainTask):
    """The ONE network, its loss and its per-branch / ensemble evaluation."""

    method = "one"

    def __init__(self, cfg: OneConfig):
        super().__init__(cfg)
        self.kd_weight = rampup_weight(cfg.kd_weight, 0, cfg.rampup_epochs)
        self.best: dict | None = None   # the best branch so far, exported at the end

    def build_model(self, spec: DataSpec):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, INIT_STREAM, 0))
            return build_one(self.cfg.arch, spec.num_classes, self.cfg.branches, spec.in_channels)

    def begin_epoch(self, epoch: int) -> dict:
        self.kd_weight = rampup_weight(self.cfg.kd_weight, epoch, self.cfg.rampup_epochs)
        return {"kd_weight": self.kd_weight}

    def loss(self, model, images, labels):
        logits, gate = model(images)
        loss = one_loss(logits, gate, labels, temperature=self.cfg.temperature,
                        kd_weight=self.kd_weight)
        with torch.no_grad():
            teacher = one_ensemble_logits([z.detach() for z in logits], gate.detach())
            stats = {"loss": loss.detach(),
                     "ce_ensemble": F.cross_entropy(teacher, labels),
                     "acc_ensemble": (teacher.argmax(1) == labels).float().mean()}
            for i, z in enumerate(logits):
                z = z.detach()
                stats[f"ce_{i}"] = F.cross_entropy(z, labels)
                stats[f"kd_{i}"] = soft_kl(z, teacher, self.cfg.temperature)
                stats[f"acc_{i}"] = (z.argmax(1) == labels).float().mean()
                stats[f"gate_{i}"] = gate[:, i].detach().mean()
        return loss, stats

    def epoch_rows(self, model, test: EvalSet, ctx: EpochContext) -> list[dict]:
        m, train = self.cfg.branches, ctx.train
        outputs, gates = [[] for _ in range(m)], []
        for x in test.batches():
            logits, gate = model(x)
            for i, z in enumerate(logits):
                outputs[i].append(z.float().cpu())
            gates.append(gate.float().cpu())
        branch_logits = [torch.cat(chunks) for chunks in outputs]
        gate = torch.cat(gates)
        rows = []
        for i, z in enumerate(branch_logits):
            acc, loss = accuracy_and_loss(z, test.labels)
            rows.append({"member": f"branch{i}", "test_acc": acc, "test_loss": loss,
                         "train_loss": train[f"ce_{i}"] + self.kd_weight * train[f"kd_{i}"],
                         "train_ce": train[f"ce_{i}"], "train_kd": train[f"kd_{i}"],
                         "train_acc": 100.0 * train[f"acc_{i}"],
                         "gate_weight": gate[:, i].mean().item(),
                         "train_gate_weight": train[f"gate_{i}"]})
        acc, loss = accuracy_and_loss(one_ensemble_logits(branch_logits, gate), test.labels)
        rows.append({"member": "ensemble", "test_acc": acc, "test_loss": loss,
                     "train_loss": train["loss"], "train_ce": train["ce_ensemble"],
                     "train_acc": 100.0 * train["acc_ensemble"]})
        acc, loss = ensemble_metrics(branch_logits, test.labels)
        rows.append({"member": "average", "test_acc": acc, "test_loss": loss})
        self._track_best(model, ctx.epoch, rows[:m])
        return rows

    def _track_best(self, model, epoch: int, branch_rows: list[dict]) -> None:
        best = max(range(len(branch_rows)), key=lambda i: (branch_rows[i]["test_acc"], -i))
        acc = branch_rows[best]["test_acc"]
        if self.best is None or acc > self.best["test_acc"]:
            state = {k: v.detach().cpu().clone() for k, v in model.branch_state_dict(best).items()}
            self.best = {"branch": best, "epoch": epoch, "test_acc": acc, "model": state,
                         "arch": model.arch, "num_classes": model.num_classes,
                         "in_channels": model.in_channels}

    def state_dict(self) -> dict:
        return {"best": self.best} if self.best is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")

    def epoch_line(self, rows: list[dict]) -> str:
        first = rows[0]
        accs = " | ".join(f"{r['member']} {r['test_acc']:.2f}" for r in rows)
        gates = "/".join(f"{r['gate_weight']:.2f}" for r in rows if "gate_weight" in r)
        return (f"[{self.cfg.name}] epoch {first['epoch'] + 1}/{self.cfg.epochs} "
                f"({first['epoch_seconds']:.1f}s, {first['images_per_second']:.0f} img/s, "
                f"lr {first['lr']:.4g}, λ {first['kd_weight']:.3f}) | {accs} | gate {gates}")

    def finish(self, run_path, state: dict) -> dict:
        best = state.get("best")
        if not best:
            return {}
        export = {"arch": best["arch"], "num_classes": best["num_classes"],
                  "in_channels": best["in_channels"], "model": best["model"],
                  "branch": best["branch"], "epoch": best["epoch"], "test_acc": best["test_acc"]}
        atomic_torch_save(export, Path(run_path) / "best_student.pt")
        return {"best_student": {"member": f"branch{best['branch']}", "epoch": best["epoch"],
                                 "test_acc": best["test_acc"], "arch": best["arch"],
                                 "path": "best_student.pt"}}


# ---- running --------------------------------------------------------------------------------
def run_one(cfg: OneConfig, dataset: Dataset | None = None, task: TrainTask | None = None,
            callbacks: list | None = None) -> dict:
    """Validate, then train ONE on Ray Train; returns the summary. Nothing starts (no Ray, no
    files) until every setting has been checked. `callbacks`: extra Ray Train callbacks."""
    from .engine import load_cohort_data
    from .runs import RunDir

    validate_one(cfg)
    dataset = dataset if dataset is not None else load_cohort_data(cfg)
    validate_against_data(cfg, dataset)
    run = RunDir.plan(cfg.output, cfg.to_dict(), resume=cfg.resume, overwrite=cfg.overwrite)
    from .train_loop import run_train_job   # imports Ray
    return run_train_job(task or OneTask(cfg), cfg, run, dataset, callbacks)


def add_one_flags(p: argparse.ArgumentParser) -> None:
    from .cli import add_data_flags, add_optim_flags, add_run_flags, add_worker_flags

    p.description = "ONE (on-the-fly native ensemble) as one Ray Train DDP job"
    p.add_argument("--arch", default="resnet32", help=f"one of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--branches", type=int, default=3, help="m, the number of branches (>= 2)")
    add_data_flags(p)
    add_optim_flags(p, epochs=300, batch_size=128, lr=0.1, wd=5e-4)
    p._option_string_actions["--batch-size"].help = (
        "GLOBAL batch size, split evenly over --workers (each takes batch/workers samples of "
        "every batch), so the results do not depend on the number of workers")
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--kd-weight", type=float, default=1.0, help="lambda, the weight of the KL terms")
    p.add_argument("--rampup-epochs", type=int, default=OFFICIAL_RAMPUP_EPOCHS,
                   help="epochs of the sigmoid ramp-up of lambda, exp(-5 (1 - t/T)^2), as the "
                        "official code; 0 = no ramp-up")
    add_run_flags(p, output="runs/one")
    add_worker_flags(p)


def one_config(args: argparse.Namespace) -> OneConfig:
    return OneConfig(
        arch=args.arch, branches=args.branches, dataset=args.dataset, data_dir=args.data_dir,
        val_fraction=args.val_fraction, crop_padding=args.crop_padding, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
        milestones=args.milestones, gamma=args.gamma, temperature=args.temperature,
        kd_weight=args.kd_weight, rampup_epochs=args.rampup_epochs, seed=args.seed,
        output=args.output, name=args.name, overwrite=args.overwrite, resume=args.resume,
        checkpoint_every=args.checkpoint_every, device=args.device, progress=args.progress,
        steps_per_epoch=args.steps_per_epoch, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures)


def run_one_job(args: argparse.Namespace) -> dict:
    summary = run_one(one_config(args))
    best = summary.get("best_student")
    if best:
        print(f"best_student.pt: {best['member']} of epoch {best['epoch'] + 1} "
              f"({best['test_acc']:.2f}%), a plain {best['arch']}", flush=True)
    return summary

"""KD (Hinton et al. 2015) and TAKD (Mirzadeh et al. 2020) as chains of Ray Train stages.

A chain `a → b → c` trains `a` alone (cross-entropy), then `b` by KD from the trained `a`,
then `c` by KD from `b`:

    L = (1 − α) · CE(z_s, y) + α · T² · KL(p_teacher^T ‖ p_student^T)      (cohort.losses.kd_loss)

The teacher runs in eval mode without gradients on the same augmented batch as the student,
every step (augmentation changes, so logits are never cached). `cohort kd` is a chain of two
(`--teacher ARCH` trained first, or `--teacher-checkpoint PATH` loaded: any model file this
project writes, e.g. ONE's best_student.pt or a TAKD stage's model.pt, or a DML student's
checkpoint). Each stage is one `cohort.train_loop` job (TorchTrainer, `--workers N`) writing
its own run directory RUN/stageI-ARCH/ with a model.pt; RUN/ holds the chain's config.json,
summary.json (the stage table), and metrics.parquet (every stage's rows, member = stage).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import check, choice, validate_against_data, validate_train_job
from .data import normalize_batch
from .errors import UsageError
from .export import instantiate, read_plain_model, save_plain_model
from .losses import kd_loss, soft_kl
from .metrics import accuracy_and_loss
from .models import MODEL_NAMES, build_model, count_parameters
from .runs import RunDir, config_differences
from .student import DataSpec, seeded_model
from .task import EpochContext, EvalSet, TrainJobConfig, TrainTask

MODEL_FILE = "model.pt"


@dataclass
class StageConfig(TrainJobConfig):
    """One network trained alone (no teacher) or by KD from `teacher` (a model file)."""
    method: str = "kd"
    arch: str = "resnet8"
    stage: int = 0
    teacher: str = ""          # path of the teacher's model file; "" = cross-entropy alone
    alpha: float = 0.9
    temperature: float = 4.0


@dataclass
class ChainConfig(TrainJobConfig):
    method: str = "takd"
    chain: list[str] = field(default_factory=lambda: ["resnet110", "resnet20", "resnet8"])
    teacher_checkpoint: str = ""   # loaded as chain[0] instead of training it
    alpha: float = 0.9
    temperature: float = 4.0
    baseline: bool = False
    skip_trained: bool = False
    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    output: str = "runs/takd"


class PlainTask(TrainTask):
    """A plain network; its loss is CE alone, or kd_loss from a frozen teacher."""

    method = "kd"

    def __init__(self, cfg: StageConfig, teacher: dict | None):
        super().__init__(cfg)
        self.teacher_payload = teacher   # CPU weights, pickled to the workers with the task
        self.teacher = None
        self.final: dict | None = None

    def build_model(self, spec: DataSpec):
        self.shape = {"num_classes": spec.num_classes, "in_channels": spec.in_channels}
        return seeded_model(self.cfg.arch, spec.num_classes, spec.in_channels, self.cfg.seed,
                            self.cfg.stage)

    def setup(self, spec: DataSpec, device: torch.device) -> None:
        if self.teacher_payload is not None:
            self.teacher = instantiate(self.teacher_payload).to(device).eval().requires_grad_(False)

    def loss(self, model, images, labels):
        logits = model(images)
        if self.teacher is None:
            loss = F.cross_entropy(logits, labels)
            kd = torch.zeros((), device=logits.device)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss = kd_loss(logits, teacher_logits, labels, self.cfg.temperature, self.cfg.alpha)
            kd = soft_kl(logits.detach(), teacher_logits, self.cfg.temperature)
        with torch.no_grad():
            stats = {"loss": loss.detach(), "ce": F.cross_entropy(logits.detach(), labels),
                     "kd": kd, "acc": (logits.detach().argmax(1) == labels).float().mean()}
        return loss, stats

    def epoch_rows(self, model, test: EvalSet, ctx: EpochContext) -> list[dict]:
        logits = torch.cat([model(x).float().cpu() for x in test.batches()])
        acc, loss = accuracy_and_loss(logits, test.labels)
        if ctx.epoch == self.cfg.epochs - 1:  # the next stage's teacher
            self.final = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                          **self.shape}
        return [{"member": "student", "arch": self.cfg.arch, "test_acc": acc, "test_loss": loss,
                 "train_loss": ctx.train["loss"], "train_ce": ctx.train["ce"],
                 "train_kd": ctx.train["kd"], "train_acc": 100.0 * ctx.train["acc"]}]

    def state_dict(self) -> dict:
        return {"final": self.final} if self.final is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.final = state.get("final")

    def finish(self, run_path, state: dict) -> dict:
        final = state.get("final")
        if final is None:
            return {}
        save_plain_model(Path(run_path) / MODEL_FILE, self.cfg.arch, final["num_classes"],
                         final["in_channels"], final["model"], stage=self.cfg.stage)
        return {"model": MODEL_FILE}


# ---- the chain --------------------------------------------------------------------------
def validate_chain(cfg: ChainConfig) -> None:
    for arch in cfg.chain:
        choice(arch, MODEL_NAMES, "--chain" if cfg.method == "takd" else "--student")
    check(len(cfg.chain) >= 2, "--chain", f"needs at least 2 models (got {len(cfg.chain)})")
    check(0.0 <= cfg.alpha <= 1.0, "--alpha", f"must be in [0, 1] (got {cfg.alpha})")
    validate_train_job(cfg)


def stage_name(index: int, arch: str) -> str:
    return f"stage{index}-{arch}"


def stage_config(cfg: ChainConfig, index: int, teacher_path: str) -> StageConfig:
    common = {k: getattr(cfg, k) for k in TrainJobConfig.__dataclass_fields__
              if k not in ("method", "output", "name", "temperature", "resume")}
    name = stage_name(index, cfg.chain[index])
    return StageConfig(**common, method="kd" if teacher_path else "alone", arch=cfg.chain[index],
                       stage=index, teacher=teacher_path, alpha=cfg.alpha,
                       temperature=cfg.temperature, output=str(Path(cfg.output) / name),
                       name=f"{cfg.name}-{name}")


def finished(stage_dir: Path, stage_cfg: StageConfig) -> bool:
    """A stage already trained with these settings (what --skip-trained reuses)."""
    config, model = stage_dir / "config.json", stage_dir / MODEL_FILE
    if not (config.exists() and model.exists()):
        return False
    differences = config_differences(json.loads(config.read_text()), stage_cfg.to_dict())
    if differences:
        raise UsageError("--skip-trained", f"{stage_dir} was trained with other settings: "
                                           + ", ".join(differences) + "; pass --overwrite")
    return True


def run_chain(cfg: ChainConfig, dataset=None, callbacks: list | None = None) -> dict:
    """Validate, then train the chain stage by stage; returns the chain's summary.
    `callbacks` (Ray Train callbacks) watch the last stage only: the distilled student."""
    from .engine import load_cohort_data

    validate_chain(cfg)
    dataset = dataset if dataset is not None else load_cohort_data(cfg)
    validate_against_data(cfg, dataset)
    first = None
    if cfg.teacher_checkpoint:
        first = read_plain_model(cfg.teacher_checkpoint, dataset.num_classes,
                                 dataset.in_channels, "--teacher-checkpoint")
        check(first["arch"] == cfg.chain[0], "--teacher",
              f"the checkpoint holds a {first['arch']}, not a {cfg.chain[0]}")
    resume_top = cfg.resume or cfg.skip_trained
    top = RunDir.plan(cfg.output, cfg.to_dict(), resume=False,
                      overwrite=cfg.overwrite or resume_top)
    top.overwrite = cfg.overwrite   # --resume / --skip-trained keep the stages already there
    from .train_loop import run_train_job   # imports Ray: only after every check
    top.start()
    top.path = top.path.resolve()
    stages, rows = [], []
    teacher_path = ""
    for index, arch in enumerate(cfg.chain):
        if index == 0 and first is not None:
            teacher_path = str(Path(cfg.teacher_checkpoint).resolve())
            acc = plain_test_accuracy(first, dataset, cfg.eval_batch_size)
            stages.append(_stage_entry(index, arch, dataset, acc, "loaded", teacher_path))
            continue
        stage_cfg = stage_config(cfg, index, teacher_path)
        stage_cfg.output = str(top.path / stage_name(index, arch))
        last = index == len(cfg.chain) - 1
        summary = _train_stage(stage_cfg, dataset, run_train_job, cfg,
                               callbacks if last else None)
        model_path = Path(stage_cfg.output) / MODEL_FILE
        acc = summary["members"]["student"]["final_test_acc"]
        stages.append(_stage_entry(index, arch, dataset, acc, "trained", str(model_path)))
        rows += _stage_rows(Path(stage_cfg.output), stage_name(index, arch))
        teacher_path = str(model_path)
        top.rows = []
        top.extra_summary["stages"] = stages
        top.append_metrics(rows)
    if cfg.baseline:
        _baselines(cfg, top, dataset, stages, run_train_job)
        top.extra_summary["stages"] = stages
        top.rows = []
        top.append_metrics(rows)
    print_stage_table(stages)
    return json.loads((top.path / "summary.json").read_text())


def _train_stage(stage_cfg: StageConfig, dataset, run_train_job, cfg: ChainConfig,
                 callbacks: list | None = None) -> dict:
    stage_dir = Path(stage_cfg.output)
    if (cfg.skip_trained or cfg.resume) and finished(stage_dir, stage_cfg):
        return json.loads((stage_dir / "summary.json").read_text())
    from .runs import latest_checkpoint
    resume = cfg.resume and latest_checkpoint(stage_dir) is not None
    stage_cfg.resume = resume
    run = RunDir.plan(stage_dir, stage_cfg.to_dict(), resume=resume,
                      overwrite=cfg.overwrite or cfg.skip_trained or (cfg.resume and not resume))
    teacher = None
    if stage_cfg.teacher:
        teacher = read_plain_model(stage_cfg.teacher, dataset.num_classes, dataset.in_channels,
                                   "--teacher-checkpoint")
    return run_train_job(PlainTask(stage_cfg, teacher), stage_cfg, run, dataset, callbacks)


def _stage_rows(stage_dir: Path, name: str) -> list[dict]:
    import pyarrow.parquet as pq
    rows = pq.read_table(stage_dir / "metrics.parquet").to_pylist()
    return [{**r, "member": name, "method": r["method"]} for r in rows]


def read_arch(path) -> str:
    from .runs import load_checkpoint_file
    if not Path(path).is_file():
        raise UsageError("--teacher-checkpoint", f"{path} is not a file")
    payload = load_checkpoint_file(Path(path))
    return payload.get("arch", "") if isinstance(payload, dict) else ""


@torch.no_grad()
def plain_test_accuracy(payload: dict, dataset, batch_size: int) -> float:
    """Test accuracy of a model file's network, on this process's CPU."""
    model = instantiate(payload).eval()
    logits = torch.cat([model(normalize_batch(dataset.test_images[i:i + batch_size],
                                              mean=dataset.mean, std=dataset.std))
                        for i in range(0, len(dataset.test_images), batch_size)])
    return accuracy_and_loss(logits, dataset.test_labels)[0]


def _stage_entry(index, arch, dataset, test_acc, how, path) -> dict:
    params = count_parameters(build_model(arch, dataset.num_classes, dataset.in_channels))
    return {"stage": index, "arch": arch, "how": how, "test_acc": test_acc, "alone_acc": None,
            "parameters": params, "model": path}


def _baselines(cfg: ChainConfig, top: RunDir, dataset, stages: list[dict], run_train_job) -> None:
    """Train every distilled arch alone with the same recipe, for the table's last column."""
    for entry in stages:
        if entry["stage"] == 0:
            continue
        alone = stage_config(cfg, entry["stage"], "")
        alone.output = str(top.path / f"baseline-{entry['arch']}")
        alone.name = f"{cfg.name}-baseline-{entry['arch']}"
        summary = _train_stage(alone, dataset, run_train_job, cfg)
        entry["alone_acc"] = summary["members"]["student"]["final_test_acc"]


def print_stage_table(stages: list[dict]) -> None:
    print(f"{'stage':>5}  {'arch':<12} {'params':>9}  {'how':<8} {'test acc':>8}  {'alone':>7}")
    for s in stages:
        params = s["parameters"]
        acc = f"{s['test_acc']:.2f}" if s["test_acc"] is not None else "-"
        alone = f"{s['alone_acc']:.2f}" if s["alone_acc"] is not None else "-"
        print(f"{s['stage']:>5}  {s['arch']:<12} {params / 1e6:>8.2f}M  {s['how']:<8} {acc:>8}  {alone:>7}",
              flush=True)


# ---- command line -----------------------------------------------------------------------
def _add_common_flags(p: argparse.ArgumentParser, output: str) -> None:
    from .cli import add_data_flags, add_optim_flags, add_run_flags, add_worker_flags
    add_data_flags(p)
    add_optim_flags(p, epochs=240, batch_size=64, lr=0.05, wd=5e-4)
    p.set_defaults(milestones=[150, 180, 210])
    p._option_string_actions["--batch-size"].help = "GLOBAL batch size, split over --workers"
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term; 1 - alpha weighs CE")
    p.add_argument("--baseline", action="store_true",
                   help="also train each distilled arch alone, for the table's last column")
    add_run_flags(p, output=output)
    add_worker_flags(p)


def add_kd_flags(p: argparse.ArgumentParser) -> None:
    p.description = "KD: a teacher (trained first, or loaded) distilled into a student"
    p.add_argument("--teacher", default="", help="teacher arch, trained first unless --teacher-checkpoint")
    p.add_argument("--teacher-checkpoint", default="",
                   help="a model file this project saved (best_student.pt, model.pt, a cohort student)")
    p.add_argument("--student", default="resnet8")
    _add_common_flags(p, output="runs/kd")


def add_takd_flags(p: argparse.ArgumentParser) -> None:
    p.description = "TAKD: teacher -> assistant(s) -> student, each stage KD from the previous"
    p.add_argument("--chain", default="resnet110,resnet20,resnet8",
                   help="comma list of archs, first the teacher (at least 2)")
    p.add_argument("--skip-trained", action="store_true",
                   help="reuse stages already trained in --output with the same settings")
    _add_common_flags(p, output="runs/takd")


def chain_config(args: argparse.Namespace, method: str, chain: list[str]) -> ChainConfig:
    return ChainConfig(
        method=method, chain=chain, teacher_checkpoint=getattr(args, "teacher_checkpoint", ""),
        alpha=args.alpha, temperature=args.temperature, baseline=args.baseline,
        skip_trained=getattr(args, "skip_trained", False), dataset=args.dataset,
        data_dir=args.data_dir, val_fraction=args.val_fraction, crop_padding=args.crop_padding,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
        milestones=args.milestones, gamma=args.gamma, seed=args.seed, output=args.output,
        name=args.name, overwrite=args.overwrite, resume=args.resume,
        checkpoint_every=args.checkpoint_every, device=args.device, progress=args.progress,
        steps_per_epoch=args.steps_per_epoch, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures)


def kd_config(args: argparse.Namespace) -> ChainConfig:
    """A KD chain of two; the teacher arch comes from --teacher or the --teacher-checkpoint file."""
    if not (args.teacher or args.teacher_checkpoint):
        raise UsageError("--teacher", "give a teacher arch (--teacher) or a model file (--teacher-checkpoint)")
    teacher = args.teacher or read_arch(args.teacher_checkpoint)
    return chain_config(args, "kd", [teacher, args.student])


def run_kd_job(args: argparse.Namespace) -> dict:
    return run_chain(kd_config(args))


def run_takd_job(args: argparse.Namespace) -> dict:
    from .cli import str_list
    return run_chain(chain_config(args, "takd", str_list(args.chain)))

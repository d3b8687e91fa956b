"""KD and TAKD chains: each stage one NetworkMethod (a KdStage) trained into its own run
directory RUN/stageI-ARCH/ (with a model.pt), the next stage's teacher. RUN/ holds the
chain's config.json, summary.json (the stage table) and metrics.parquet (every stage's rows,
member = stage). `--resume` continues an interrupted chain, `--skip-trained` reuses stages
already trained with the same settings, `--baseline` trains each distilled arch alone too."""
from __future__ import annotations

import json
from dataclasses import fields

import torch

from ..config import TrainJobConfig, require, validate, validate_against_data
from ..data import normalize_batch
from ..errors import UsageError
from ..export import instantiate, read_plain_model
from ..methods.kd import MODEL_FILE, ChainConfig, KdStage, StageConfig, stage_method
from ..metrics import accuracy_and_loss
from ..models import build_model, count_parameters
from ..runs import RunDir, config_differences, latest_checkpoint, load_checkpoint_file
from ..storage import Location, location, read_parquet
from .common import load_data


def stage_name(index: int, arch: str) -> str:
    return f"stage{index}-{arch}"


def stage_config(cfg: ChainConfig, index: int, teacher_path: str) -> StageConfig:
    common = {f.name: getattr(cfg, f.name) for f in fields(TrainJobConfig)
              if f.name not in ("method", "output", "name", "temperature", "resume", "recipe")}
    name = stage_name(index, cfg.chain[index])
    return StageConfig(**common, method=stage_method(teacher_path), arch=cfg.chain[index],
                       stage=index, teacher=teacher_path, alpha=cfg.alpha,
                       temperature=cfg.temperature, output=str(location(cfg.output) / name),
                       name=f"{cfg.name}-{name}")


def finished(stage_dir: Location, stage_cfg: StageConfig) -> bool:
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
    if cfg.teacher_checkpoint and not cfg.chain[0]:
        cfg.chain[0] = read_arch(cfg.teacher_checkpoint)   # KD from a model file: its arch
    validate(cfg)
    dataset = dataset if dataset is not None else load_data(cfg)
    validate_against_data(cfg, dataset)
    first = None
    if cfg.teacher_checkpoint:
        first = read_plain_model(cfg.teacher_checkpoint, dataset.num_classes,
                                 dataset.in_channels, "--teacher-checkpoint")
        require(first["arch"] == cfg.chain[0], "--teacher",
                f"the checkpoint holds a {first['arch']}, not a {cfg.chain[0]}")
    resume_top = cfg.resume or cfg.skip_trained
    top = RunDir.plan(cfg.output, cfg.to_dict(), resume=False,
                      overwrite=cfg.overwrite or resume_top)
    top.overwrite = cfg.overwrite   # --resume / --skip-trained keep the stages already there
    top.start()
    top.path = top.path.resolve()
    stages, rows = [], []
    teacher_path = ""
    for index, arch in enumerate(cfg.chain):
        if index == 0 and first is not None:
            teacher_path = str(location(cfg.teacher_checkpoint, "--teacher-checkpoint").resolve())
            acc = plain_test_accuracy(first, dataset, cfg.eval_batch_size)
            stages.append(_stage_entry(index, arch, dataset, acc, "loaded", teacher_path))
            continue
        stage_cfg = stage_config(cfg, index, teacher_path)
        stage_cfg.output = str(top.path / stage_name(index, arch))
        last = index == len(cfg.chain) - 1
        summary = _train_stage(stage_cfg, dataset, cfg,
                               callbacks if last else None)
        model_path = location(stage_cfg.output) / MODEL_FILE
        acc = summary["members"]["student"]["final_test_acc"]
        stages.append(_stage_entry(index, arch, dataset, acc, "trained", str(model_path)))
        rows += _stage_rows(location(stage_cfg.output), stage_name(index, arch))
        teacher_path = str(model_path)
        top.rows = []
        top.extra_summary["stages"] = stages
        top.append_metrics(rows)
    if cfg.baseline:
        _baselines(cfg, top, dataset, stages)
        top.extra_summary["stages"] = stages
        top.rows = []
        top.append_metrics(rows)
    print_stage_table(stages)
    return json.loads((top.path / "summary.json").read_text())


def _train_stage(stage_cfg: StageConfig, dataset, cfg: ChainConfig,
                 callbacks: list | None = None) -> dict:
    stage_dir = location(stage_cfg.output)
    if (cfg.skip_trained or cfg.resume) and finished(stage_dir, stage_cfg):
        return json.loads((stage_dir / "summary.json").read_text())
    resume = cfg.resume and latest_checkpoint(stage_dir) is not None
    stage_cfg.resume = resume
    run = RunDir.plan(stage_dir, stage_cfg.to_dict(), resume=resume,
                      overwrite=cfg.overwrite or cfg.skip_trained or (cfg.resume and not resume))
    teacher = None
    if stage_cfg.teacher:
        teacher = read_plain_model(stage_cfg.teacher, dataset.num_classes, dataset.in_channels,
                                   "--teacher-checkpoint")
    from . import run_network
    return run_network(KdStage(stage_cfg, teacher), run, dataset, callbacks=callbacks)


def _stage_rows(stage_dir: Location, name: str) -> list[dict]:
    rows = read_parquet(stage_dir / "metrics.parquet").to_pylist()
    return [{**r, "member": name, "method": r["method"]} for r in rows]


def read_arch(path) -> str:
    path = location(path, "--teacher-checkpoint")
    if not path.is_file():
        raise UsageError("--teacher-checkpoint", f"{path} is not a file")
    payload = load_checkpoint_file(path)
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


def _baselines(cfg: ChainConfig, top: RunDir, dataset, stages: list[dict]) -> None:
    """Train every distilled arch alone with the same recipe, for the table's last column."""
    for entry in stages:
        if entry["stage"] == 0:
            continue
        alone = stage_config(cfg, entry["stage"], "")
        alone.output = str(top.path / f"baseline-{entry['arch']}")
        alone.name = f"{cfg.name}-baseline-{entry['arch']}"
        summary = _train_stage(alone, dataset, cfg)
        entry["alone_acc"] = summary["members"]["student"]["final_test_acc"]


def print_stage_table(stages: list[dict]) -> None:
    print(f"{'stage':>5}  {'arch':<12} {'params':>9}  {'how':<8} {'test acc':>8}  {'alone':>7}")
    for s in stages:
        params = s["parameters"]
        acc = f"{s['test_acc']:.2f}" if s["test_acc"] is not None else "-"
        alone = f"{s['alone_acc']:.2f}" if s["alone_acc"] is not None else "-"
        print(f"{s['stage']:>5}  {s['arch']:<12} {params / 1e6:>8.2f}M  {s['how']:<8} {acc:>8}  {alone:>7}",
              flush=True)



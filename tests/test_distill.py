"""KD and TAKD chains on Ray Train (CPU, gloo, digits)."""
import json
import os

import pytest
import ray
import torch

from cohort.cli import main
from cohort.data import normalize_batch
from cohort.methods.kd import ChainConfig
from cohort.runtime.chain import run_chain
from cohort.export import instantiate, save_plain_model
from cohort.models import build_model
from cohort.runs import load_checkpoint_file

FAST = dict(dataset="digits", batch_size=64, lr=0.1, schedule="cosine", progress=False)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def predictions(model_file, digits):
    model = instantiate(load_checkpoint_file(model_file)).eval()
    with torch.no_grad():
        x = normalize_batch(digits.test_images, mean=digits.mean, std=digits.std)
        return model(x).argmax(1)


def test_three_stage_chain_learns_and_skip_trained_reuses_stages(tmp_path, digits):
    out = tmp_path / "takd"
    summary = run_chain(ChainConfig(chain=["resnet14", "resnet8", "resnet8"], epochs=3,
                                    output=str(out), **FAST), digits)
    stages = summary["stages"]
    assert [s["arch"] for s in stages] == ["resnet14", "resnet8", "resnet8"]
    for stage in stages:
        assert stage["how"] == "trained" and stage["test_acc"] > 60.0, stage
        model_file = out / f"stage{stage['stage']}-{stage['arch']}" / "model.pt"
        # The exported network reproduces the stage's reported accuracy.
        acc = (predictions(model_file, digits) == digits.test_labels).float().mean().item() * 100
        assert acc == pytest.approx(stage["test_acc"], abs=1e-6)
    config = json.loads((out / "stage2-resnet8" / "config.json").read_text())
    assert config["teacher"].endswith("stage1-resnet8/model.pt") and config["method"] == "kd"
    assert set(summary["members"]) == {"stage0-resnet14", "stage1-resnet8", "stage2-resnet8"}

    # --skip-trained reuses every stage already trained with the same settings: nothing retrains.
    stamps = {p: os.stat(p).st_mtime_ns for p in out.glob("stage*/model.pt")}
    again = run_chain(ChainConfig(chain=["resnet14", "resnet8", "resnet8"], epochs=3,
                                  output=str(out), skip_trained=True, **FAST), digits)
    assert {p: os.stat(p).st_mtime_ns for p in out.glob("stage*/model.pt")} == stamps
    assert [s["test_acc"] for s in again["stages"]] == [s["test_acc"] for s in stages]


def constant_teacher(path, digits, favourite: int):
    """A resnet8 whose logits ignore the input and always favour one class."""
    model = build_model("resnet8", 10, 1)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favourite), 10) * 8.0)
    save_plain_model(path, "resnet8", 10, 1, model.state_dict())


def test_kd_pulls_the_student_toward_the_teachers_logits(tmp_path, digits):
    """alpha = 1 is KD alone: the student copies a teacher that always says 3, not the labels
    (a tenth of which are 3)."""
    teacher = tmp_path / "teacher.pt"
    constant_teacher(teacher, digits, favourite=3)
    assert main(["kd", "--teacher-checkpoint", str(teacher), "--student", "resnet8", "--dataset",
                 "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.1", "--schedule",
                 "cosine", "--temperature", "1", "--no-progress", "--alpha", "1.0",
                 "--output", str(tmp_path / "pure")]) == 0
    pure = predictions(tmp_path / "pure" / "stage1-resnet8" / "model.pt", digits)
    assert (pure == 3).float().mean() > 0.9
    assert (digits.test_labels == 3).float().mean() < 0.15
    summary = json.loads((tmp_path / "pure" / "summary.json").read_text())
    assert summary["stages"][0]["how"] == "loaded"
    assert summary["stages"][0]["test_acc"] == pytest.approx(
        100.0 * (digits.test_labels == 3).float().mean().item(), abs=1e-6)
    assert summary["stages"][1]["test_acc"] < 20.0


def test_kd_teacher_sees_the_students_augmented_batch_in_eval_mode_without_grad(digits):
    """KdStage.loss, as the Train loop calls it on one augmented batch: the teacher gets the
    very tensor the student gets, runs in eval mode (BatchNorm statistics untouched) and
    builds no autograd graph; the loss is kd_loss of the two outputs."""
    from cohort.data import augment_batch
    from cohort.methods.kd import KdStage, StageConfig
    from cohort.losses import kd_loss
    from cohort.student import DataSpec

    spec = DataSpec.of(digits)
    teacher_net = build_model("resnet8", 10, 1)
    with torch.no_grad():   # non-trivial BatchNorm statistics, so a change would show
        for module in teacher_net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    payload = {"arch": "resnet8", "num_classes": 10, "in_channels": 1,
               "model": {k: v.clone() for k, v in teacher_net.state_dict().items()}}
    cfg = StageConfig(arch="resnet8", stage=1, teacher="teacher.pt", temperature=4.0, alpha=0.9,
                      dataset="digits", batch_size=32, progress=False)
    task = KdStage(cfg, payload)
    student = task.build_model(spec)
    task.setup(spec, torch.device("cpu"))
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}

    seen = {}

    def spy(name):
        def hook(module, inputs, output):
            seen[name] = {"input": inputs[0], "output": output, "training": module.training,
                          "grad_enabled": torch.is_grad_enabled(),
                          "bn_training": [m.training for m in module.modules()
                                          if isinstance(m, torch.nn.BatchNorm2d)]}
        return hook

    student.register_forward_hook(spy("student"))
    task.teacher.register_forward_hook(spy("teacher"))
    student.train()
    views = augment_batch(digits.train_images[:32], seed=123, padding=spec.crop_padding,
                          mean=spec.mean, std=spec.std)
    plain = normalize_batch(digits.train_images[:32], mean=spec.mean, std=spec.std)
    assert not torch.equal(views, plain)   # the batch really is augmented
    labels = digits.train_labels[:32]
    loss = task.loss(student, [views], labels).total()

    teacher, mine = seen["teacher"], seen["student"]
    assert teacher["input"] is mine["input"] is views   # the student's augmented views, as given
    assert mine["training"] and all(mine["bn_training"])
    assert not teacher["training"] and teacher["bn_training"] and not any(teacher["bn_training"])
    assert not teacher["grad_enabled"] and not teacher["output"].requires_grad
    assert teacher["output"].grad_fn is None
    assert loss.item() == pytest.approx(
        kd_loss(mine["output"].detach(), teacher["output"], labels, 4.0, 0.9).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    after = task.teacher.state_dict()
    assert any(k.endswith("running_mean") for k in after)
    # running means, variances and num_batches_tracked: all unchanged
    assert all(torch.equal(before[k], after[k]) for k in before)


BAD = [
    (["kd", "--teacher", "resnet99"], "--teacher"),
    (["kd", "--teacher", "resnet8", "--student", "resnet99"], "--student"),
    (["kd", "--teacher", "resnet8", "--alpha", "1.5"], "--alpha"),
    (["kd", "--teacher-checkpoint", "/nonexistent.pt"], "--teacher-checkpoint"),
    (["takd", "--chain", "resnet8"], "--chain"),
    (["takd", "--chain", "resnet8,resnet8", "--temperature", "0"], "--temperature"),
    (["takd", "--chain", "resnet8,resnet8", "--workers", "3"], "--batch-size"),
]


@pytest.mark.parametrize("args,flag", BAD, ids=[b[1] for b in BAD])
def test_bad_distill_flags_exit_2_before_anything(tmp_path, capsys, args, flag):
    out = tmp_path / "run"
    code = main([*args, "--dataset", "digits", "--batch-size", "64", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not out.exists()


def test_foreign_teacher_file_is_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    code = main(["kd", "--teacher", "resnet8", "--teacher-checkpoint", str(bogus), "--dataset",
                 "digits", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--teacher-checkpoint" in err and "not a cohort model file" in err

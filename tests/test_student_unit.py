"""Fast unit tests of cohort.student: one student's step, schedule, views and state (no Ray)."""
from __future__ import annotations

import copy
import dataclasses
import math
import types

import pytest
import torch
import torch._dynamo  # noqa: F401  (the slow one-off import the first torch.optim.SGD triggers)
import torch.nn.functional as F

from cohort import student as S
from cohort.methods import config_class
from cohort.data import Dataset, augment_batch, derive_seed, normalize_batch
from cohort.errors import TrainingDiverged
from cohort.models import build_model
from cohort.optim import learning_rate
from cohort.step import StepLoss
from cohort.student import DataSpec, Student

CPU = torch.device("cpu")
SPEC = DataSpec(num_classes=10, in_channels=1, mean=(0.3,), std=(0.2,), crop_padding=2)


def cfg(**overrides):
    settings = dict(method="dml", students=3, archs=["resnet8"], dataset="digits", epochs=6,
                    lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True, schedule="step",
                    milestones=[2, 4], gamma=0.5, seed=7, output="runs/unit", device="cpu")
    settings.update(overrides)
    return config_class(settings["method"])(**settings)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a, b):
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- helpers

def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert S.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert S.resolve_device("auto") == torch.device("cuda")
    assert S.resolve_device("cpu") == torch.device("cpu")
    assert S.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_seeded_model_is_the_members_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = S.seeded_model("resnet8", 10, 1, seed=7, member=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(derive_seed(7, S.INIT_STREAM, 2))
    reference = build_model("resnet8", 10, 1)
    assert_same_params(params(model), params(reference))
    assert next(model.parameters()).shape[1] == 1                     # in_channels
    assert list(model.parameters())[-1].shape == (10,)                # num_classes
    other_member = S.seeded_model("resnet8", 10, 1, seed=7, member=1)
    other_seed = S.seeded_model("resnet8", 10, 1, seed=8, member=2)
    first = next(model.parameters())
    assert not torch.equal(first, next(other_member.parameters()))
    assert not torch.equal(first, next(other_seed.parameters()))


def _dataset(padding=1):
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.int64)
    return Dataset(name="x", train_images=images, train_labels=labels, test_images=images,
                   test_labels=labels, num_classes=5, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6],
                   crop_padding=padding)


def test_dataspec_of_dataset_and_padding_override():
    spec = DataSpec.of(_dataset(padding=3))
    assert spec == DataSpec(5, 3, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 3, flip=True, num_train=4)
    mirror_sensitive = dataclasses.replace(_dataset(padding=3), flip=False)
    assert DataSpec.of(mirror_sensitive).flip is False
    assert DataSpec.of(mirror_sensitive, flip="on").flip is True      # --flip on
    assert DataSpec.of(_dataset(padding=3), flip="off").flip is False  # --flip off
    assert DataSpec.of(_dataset(padding=3), flip="auto").flip is True
    assert isinstance(spec.mean, tuple) and isinstance(spec.std, tuple)
    assert DataSpec.of(_dataset(padding=3), crop_padding=0).crop_padding == 0
    assert DataSpec.of(_dataset(padding=3), crop_padding=5).crop_padding == 5
    assert DataSpec.of(_dataset(padding=3), crop_padding=-1).crop_padding == 3


def test_to_cpu_detaches_nested_tensors():
    leaf = torch.ones(2, requires_grad=True)
    out = S._to_cpu({"a": [leaf, {"b": leaf * 2}], "c": 3, "d": "x"})
    assert not out["a"][0].requires_grad and not out["a"][1]["b"].requires_grad
    assert torch.equal(out["a"][1]["b"], torch.full((2,), 2.0))
    assert out["c"] == 3 and out["d"] == "x" and isinstance(out["a"], list)


# ----------------------------------------------------------------------------- construction

@pytest.mark.parametrize("views,stream", [("separate", 2), ("shared", 0)])
def test_student_construction(views, stream):
    c = cfg(views=views)
    s = Student(2, "resnet8", c, SPEC, CPU)
    assert s.name == "student2" and s.index == 2 and s.arch == "resnet8" and s.epoch == 0
    assert s.cfg is c and s.spec is SPEC and s.device == CPU
    assert s.view_stream == stream
    assert c.zero_init_residual == "auto"   # the default: a resnet8 keeps the plain init
    assert_same_params(params(s.model), params(S.seeded_model("resnet8", 10, 1, 7, 2)))
    group = s.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == \
        (0.2, 0.9, 5e-4, True)
    assert sum(len(g["params"]) for g in s.optimizer.param_groups) == len(list(s.model.parameters()))


def test_kdcl_students_default_to_separate_views():
    assert Student(1, "resnet8", cfg(method="kdcl"), SPEC, CPU).view_stream == 1
    assert Student(1, "resnet8", cfg(method="dml"), SPEC, CPU).view_stream == 0


# ----------------------------------------------------------------------------- epoch / schedule

def test_begin_epoch_sets_the_scheduled_lr_and_train_mode():
    c = cfg()
    s = Student(0, "resnet8", c, SPEC, CPU)
    got = []
    for epoch in range(6):
        s.model.eval()
        got.append(s.begin_epoch(epoch))
        assert s.model.training and s.epoch == epoch
        assert [g["lr"] for g in s.optimizer.param_groups] == [got[-1]]
    assert got == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.05], rel=1e-12)
    cos = Student(0, "resnet8", cfg(schedule="cosine", epochs=4), SPEC, CPU)
    assert cos.begin_epoch(1) == pytest.approx(learning_rate(0.2, "cosine", 1, 4))
    assert cos.begin_epoch(1) == pytest.approx(0.5 * 0.2 * (1 + math.cos(math.pi / 4)))


def test_end_epoch_without_steps_is_zero_not_nan(monkeypatch):
    s = Student(0, "resnet8", cfg(), SPEC, CPU)
    clock = iter([100.0, 100.5])
    monkeypatch.setattr(S, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    s.begin_epoch(0)
    stats = s.end_epoch()
    # no step, no loss terms to average: only the accuracy (0) and the time
    assert {k: v for k, v in stats.items() if k != "images_per_second"} == {
        "train_acc": 0.0, "train_seconds": 0.5}


# ----------------------------------------------------------------------------- forward / learn

@pytest.mark.parametrize("index,views,flip", [(1, "separate", True), (2, "shared", True),
                                              (1, "separate", False)])
def test_forward_is_the_model_on_the_seeded_view(index, views, flip):
    s = Student(index, "resnet8", cfg(views=views), dataclasses.replace(SPEC, flip=flip), CPU)
    s.begin_epoch(3)
    s.model.eval()           # so the reference call below sees the same BatchNorm state
    images, _ = batch()
    out = s.forward(images, step=5)
    stream = index if views == "separate" else 0
    seed = derive_seed(7, S.VIEW_STREAM, stream, 3, 5)
    view = augment_batch(images, seed=seed, padding=2, flip=flip, mean=(0.3,), std=(0.2,))
    assert torch.equal(out, s.model(view))
    mirrored = augment_batch(images, seed=seed, padding=2, flip=not flip, mean=(0.3,), std=(0.2,))
    assert not torch.equal(out, s.model(mirrored))   # the dataset's flip setting decides
    assert out.requires_grad and out.shape == (8, 10)
    assert not torch.equal(out, s.forward(images, step=6))
    s.begin_epoch(4)
    s.model.eval()
    assert not torch.equal(out, s.forward(images, step=5))


def _step(s, images, labels, step, kd_value=0.25):
    logits = s.forward(images, step)
    ce = F.cross_entropy(logits, labels)
    loss = StepLoss({"ce": ce, "kd": torch.tensor(kd_value)})
    return s.learn(loss, logits, labels, step), logits.detach(), ce.item()


def test_learn_is_one_sgd_step_and_sums_the_epoch(monkeypatch):
    c = cfg()
    s, ref = Student(0, "resnet8", c, SPEC, CPU), Student(0, "resnet8", c, SPEC, CPU)
    clock = iter([10.0, 11.0, 12.0])   # s.begin_epoch, ref.begin_epoch, s.end_epoch
    monkeypatch.setattr(S, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    s.begin_epoch(0)
    ref.begin_epoch(0)
    sizes, losses_, ces, correct = (8, 4), [], [], 0
    for step, n in enumerate(sizes):
        images, labels = batch(n, seed=step)
        value, logits, ce = _step(s, images, labels, step)
        losses_.append(value)
        ces.append(ce)
        correct += int((logits.argmax(1) == labels).sum())
        # By hand: zero the gradients, backward, one SGD step.
        ref.optimizer.zero_grad()
        z = ref.forward(images, step)
        loss = F.cross_entropy(z, labels) + 0.25
        assert value == pytest.approx(loss.item(), rel=1e-6)
        loss.backward()
        ref.optimizer.step()
        assert_same_params(params(s.model), params(ref.model))
    stats = s.end_epoch()
    total = sum(sizes)
    # Summed in float64: the float32 per-step values, exactly (no float32 accumulation).
    assert stats["train_loss"] == pytest.approx(sum(v * n for v, n in zip(losses_, sizes)) / total,
                                                rel=1e-14)
    assert stats["train_ce"] == pytest.approx(sum(v * n for v, n in zip(ces, sizes)) / total,
                                              rel=1e-14)
    assert stats["train_kd"] == pytest.approx(0.25, rel=1e-14)
    assert stats["train_acc"] == pytest.approx(100.0 * correct / total)
    assert stats["train_seconds"] == 2.0
    assert stats["images_per_second"] == pytest.approx(total / 2.0)


def test_learn_single_sample_epoch_and_zero_time(monkeypatch):
    s = Student(0, "resnet8", cfg(), SPEC, CPU)
    monkeypatch.setattr(S, "time", types.SimpleNamespace(perf_counter=lambda: 5.0))
    s.begin_epoch(0)
    images, labels = batch(1, seed=3)
    value, logits, _ = _step(s, images, labels, 0, kd_value=0.5)
    stats = s.end_epoch()
    assert stats["train_loss"] == pytest.approx(value)
    assert stats["train_kd"] == pytest.approx(0.5)
    assert stats["train_acc"] == 100.0 * float(logits.argmax(1).item() == labels.item())
    assert stats["images_per_second"] == pytest.approx(1.0 / 1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_learn_refuses_a_non_finite_loss_without_stepping(bad):
    s = Student(1, "resnet8", cfg(), SPEC, CPU)
    s.begin_epoch(2)
    images, labels = batch()
    logits = s.forward(images, 4)
    before = params(s.model)
    loss = StepLoss({"ce": F.cross_entropy(logits, labels) * bad})
    with pytest.raises(TrainingDiverged) as info:
        s.learn(loss, logits, labels, step=4)
    err = info.value
    assert (err.member, err.epoch, err.step) == ("student1", 2, 4)
    assert str(err.value) == str(bad)
    assert all(p.grad is None for p in s.model.parameters())
    assert_same_params(params(s.model), before)
    assert "train_loss" not in s.end_epoch()   # the refused step was not counted


# ----------------------------------------------------------------------------- predict / state

def test_predict_is_eval_mode_batched_float32_cpu():
    s = Student(0, "resnet8", cfg(), SPEC, CPU)
    s.begin_epoch(0)
    images, labels = batch(6)
    for step in range(2):                    # move the BatchNorm statistics off their defaults
        _step(s, images, labels, step)
    running = [b.clone() for b in s.model.buffers()]
    out = s.predict(images[:5], batch_size=2)
    assert s.model.training                                    # back to train mode
    assert all(torch.equal(a, b) for a, b in zip(running, s.model.buffers()))
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (5, 10)
    reference = copy.deepcopy(s.model).eval()
    with torch.no_grad():
        want = reference(normalize_batch(images[:5], mean=(0.3,), std=(0.2,)))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.predict(images[:5]), want, rtol=1e-5, atol=1e-6)
    assert not out.requires_grad


def test_state_dict_round_trip_continues_exactly():
    c = cfg()
    a = Student(1, "resnet8", c, SPEC, CPU)
    a.begin_epoch(0)
    images, labels = batch(8)
    _step(a, images, labels, 0)
    state = a.state_dict()
    assert state["arch"] == "resnet8" and state["index"] == 1
    assert set(state["model"]) == set(a.model.state_dict())
    assert all(t.device.type == "cpu" for t in state["model"].values())
    momentum = [v["momentum_buffer"] for v in state["optimizer"]["state"].values()]
    assert len(momentum) == len(list(a.model.parameters()))
    state = copy.deepcopy(state)                  # a checkpoint, detached from the live student

    b = Student(1, "resnet8", c, SPEC, CPU)
    b.load_state_dict(state)
    assert_same_params(params(b.model), params(a.model))
    for s in (a, b):
        s.begin_epoch(0)
        _step(s, images, labels, 1)
    assert_same_params(params(b.model), params(a.model))    # the momentum came along too


def test_student_model_lives_on_its_device():
    """The model is moved to the student's device (the meta device stands in for a GPU)."""
    s = Student(0, "resnet8", cfg(), SPEC, torch.device("meta"))
    assert {p.device.type for p in s.model.parameters()} == {"meta"}


def test_warmup_raises_the_rate_linearly_per_step_then_follows_the_schedule():
    from cohort.optim import warmup_factor
    assert [warmup_factor(0, s, 4, 1.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [warmup_factor(e, s, 4, 0.5) for e, s in ((0, 0), (0, 1), (0, 2), (1, 0))] == [0.5, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0, 4, 0.0) == 1.0
    s = Student(0, "resnet8", cfg(warmup_epochs=2.0, schedule="constant"), SPEC, CPU)
    seen = []
    for epoch in range(3):
        s.begin_epoch(epoch, steps=2)
        for step in range(2):
            images, labels = batch(4, seed=step)
            _step(s, images, labels, step)
            seen.append(s.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])

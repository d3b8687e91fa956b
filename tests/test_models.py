"""Registry, parameter counts, shapes, the trunk/last-stage split and the ONE network."""
import pytest
import torch

from cohort.models import (MODEL_NAMES, ONE_MODEL_NAMES, build_model, build_one,
                           count_parameters)

# Exact counts measured with 100 classes, 3 input channels (1×1 conv + BN projection
# shortcuts for the ResNets, bare 1×1 conv shortcuts for the pre-activation WRNs).
EXACT_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "wrn_28_10": 36_536_884,
    "mobilenetv2": 2_351_972,  # width 1.0, CIFAR strides
}

# Published counts in millions (RepDistiller's table for CIFAR-100; WRN paper for 28-10).
PUBLISHED_M = {
    "resnet8": 0.08, "resnet20": 0.28, "resnet32": 0.47, "resnet44": 0.66, "resnet56": 0.86,
    "resnet110": 1.73, "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_2": 0.70,
    "wrn_40_1": 0.57, "wrn_40_2": 2.25, "wrn_28_10": 36.5,
}



@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Batches of 2–4 gain nothing from intra-op threads, and on a busy CPU they cost 5×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Forward passes of the 36.5M-parameter WRN-28-10 on 32×32 inputs are too slow for CPU tests.
SMALL_NAMES = [n for n in MODEL_NAMES if n != "wrn_28_10"]


def test_registry_lists_every_family():
    assert set(MODEL_NAMES) == set(EXACT_100)
    assert ONE_MODEL_NAMES == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_exact(name):
    assert count_parameters(build_model(name, 100)) == EXACT_100[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_count_matches_published(name):
    published = PUBLISHED_M[name] * 1e6
    # within 3%, or equal once rounded as the table rounds (resnet8: 83,892 → "0.08M")
    close = abs(EXACT_100[name] - published) / published < 0.03
    assert close or round(EXACT_100[name] / 1e6, 2) == PUBLISHED_M[name]


def test_count_parameters_trainable_only():
    model = build_model("resnet8", 10)
    model.classifier.requires_grad_(False)
    frozen = count_parameters(model.classifier)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_output_shape_cifar(name):
    model = build_model(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_digits_8x8_single_channel_and_split_contract(name):
    model = build_model(name, 10, in_channels=1)
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {"trunk", "last_stage", "classifier"}
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.in_features == model.feature_channels
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert model.trunk(x).shape[1] == model.trunk_channels
        assert model(x).shape == (2, 10)  # train mode: batch statistics


def test_forward_is_the_split():
    model = build_model("wrn_16_1", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.last_stage(model.trunk(x)).mean(dim=(2, 3))
        assert torch.allclose(model(x), model.classifier(pooled), atol=1e-6)


def test_initialisation():
    model = build_model("resnet8", 10)
    bn = model.trunk.stem[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    conv = model.trunk.stem[0]  # kaiming fan_out: std = sqrt(2 / (out_channels · 3 · 3))
    assert conv.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.3)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_model("resnet8", 10).state_dict()
    torch.manual_seed(3)
    b = build_model("resnet8", 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_arch_names_choices():
    with pytest.raises(ValueError, match=r"unknown arch 'resnet9'; choose from: .*resnet32"):
        build_model("resnet9", 10)
    with pytest.raises(ValueError, match="unknown arch"):
        build_one("resnet9", 10, 3)


# ---------------------------------------------------------------------------------- ONE

def one_params_expected(plain, branches):
    """trunk + m × (last stage + classifier) + gate (Linear C→m and BatchNorm1d(m))."""
    branch = count_parameters(plain.last_stage) + count_parameters(plain.classifier)
    gate = plain.trunk_channels * branches + branches + 2 * branches
    return count_parameters(plain.trunk) + branches * branch + gate


@pytest.mark.parametrize("name", ONE_MODEL_NAMES)
def test_one_forward_gate_and_export(name):
    branches = 2
    one = build_one(name, 10, branches, in_channels=1)
    plain = build_model(name, 10, in_channels=1)
    assert count_parameters(one) == one_params_expected(plain, branches)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        logits, gate = one(x)  # train mode
        assert len(logits) == branches and all(z.shape == (4, 10) for z in logits)
        assert gate.shape == (4, branches)
        one.eval()
        logits, gate = one(x)
    assert torch.all(gate >= 0)
    assert torch.allclose(gate.sum(dim=1), torch.ones(4), atol=1e-6)
    plain.eval()
    for i in range(branches):
        plain.load_state_dict(one.branch_state_dict(i), strict=True)
        with torch.no_grad():
            assert torch.equal(plain(x), logits[i])
    exported = one.export_branch(branches - 1)  # the same load, done by the net itself
    assert not exported.training
    with torch.no_grad():
        assert torch.equal(exported(x), logits[-1])


def test_one_three_branches_resnet32_cifar():
    one = build_one("resnet32", 100, 3)
    logits, gate = one(torch.randn(2, 3, 32, 32))
    assert [z.shape for z in logits] == [(2, 100)] * 3 and gate.shape == (2, 3)
    # trunk 112,592 + 3 × (360,164) + gate (32·3 + 3 + 6) = 1,193,189
    assert count_parameters(one) == 112_592 + 3 * 360_164 + 105 == 1_193_189


@pytest.mark.parametrize("branches", [0, 1])
def test_one_needs_two_branches(branches):
    with pytest.raises(ValueError, match="--branches"):
        build_one("resnet8", 10, branches)


def test_one_branches_start_apart_and_share_one_trunk():
    one = build_one("resnet8", 10, 3)
    weights = [b.classifier.weight for b in one.branches]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    stage = [next(b.last_stage.parameters()) for b in one.branches]
    assert not torch.equal(stage[0], stage[1])
    assert sum(1 for key in one.state_dict() if key.startswith("trunk.stem.0.weight")) == 1


def test_one_backward_reaches_trunk_branches_and_gate():
    one = build_one("resnet8", 10, 3)
    logits, gate = one(torch.randn(4, 3, 32, 32))
    ensemble = sum(g.unsqueeze(1) * z for g, z in zip(gate.unbind(1), logits))
    (sum(z.square().mean() for z in logits) + ensemble.square().mean()).backward()
    assert all(p.grad is not None for p in one.parameters())


def test_one_export_is_independent_copy():
    one = build_one("resnet8", 10, 2)
    exported = one.export_branch(1)
    with torch.no_grad():
        exported.classifier.weight.add_(1.0)
    assert not torch.equal(exported.classifier.weight, one.branches[1].classifier.weight)
    with pytest.raises(IndexError):
        one.branch_state_dict(2)


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "mobilenetv2", "wrn_16_2"])
def test_zero_init_residual_zeroes_each_residual_branchs_last_norm_only(name):
    """Every block then starts as the identity; nothing else changes (no random draws)."""
    from cohort.models.base import residual_norms, zero_init_residual
    torch.manual_seed(0)
    model = build_model(name, 10, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = residual_norms(model)
    zeroed = {id(n.weight) for n in norms}
    rng = torch.random.get_rng_state()
    zero_init_residual(model)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        param = dict(model.named_parameters()).get(key)
        if param is not None and id(param) in zeroed:
            assert torch.count_nonzero(value) == 0, key
        else:
            assert torch.equal(value, before[key]), key
    expected = {"resnet20": 9, "resnet8x4": 3, "mobilenetv2": 10, "wrn_16_2": 0}[name]
    assert len(norms) == expected


def test_auto_zero_init_is_for_nets_deeper_than_ten_residual_blocks():
    from cohort.models import zero_init_wanted
    from cohort.models.registry import residual_blocks
    depths = {name: residual_blocks(name) for name in ("resnet8", "resnet20", "resnet32", "resnet110")}
    assert depths == {"resnet8": 3, "resnet20": 9, "resnet32": 15, "resnet110": 54}
    assert [zero_init_wanted("auto", n) for n in depths] == [False, False, True, True]
    assert all(zero_init_wanted("on", n) for n in depths)
    assert not any(zero_init_wanted("off", n) for n in depths)
    with pytest.raises(ValueError, match="zero_init_residual"):
        zero_init_wanted(True, "resnet8")
    # the branch networks decide by their arch: a resnet32 ONE starts zero-initialised
    from cohort.methods.one import OneConfig, seeded
    from cohort.models import build_one
    from cohort.models.base import residual_norms
    for arch, zeroed in (("resnet32", True), ("resnet8", False)):
        cfg = OneConfig(arch=arch)
        net = seeded(cfg, lambda: build_one(arch, 10, 3, 1))
        scales = torch.cat([n.weight for n in residual_norms(net)])
        assert bool((scales == 0).all()) is zeroed and bool((scales == 1).all()) is not zeroed

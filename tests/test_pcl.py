"""PCL (Wu & Gong 2021): the loss terms against a plain-loop float64 reference, the temporal
mean (EMA) update, and the multi-view network with its peer-ensemble head and branch export.
Pure unit tests: CPU, no Ray, each well under a second."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cohort.methods.one import rampup_weight
from cohort.methods.pcl import Pcl, PclConfig, default_max_decay, ema_decay, ema_update, pcl_terms
from cohort.student import DataSpec
from cohort.models.base import global_pool
from cohort.models.pcl import PclNet, build_pcl
from cohort.models.registry import build_model
from cohort.step import StepLoss

ARCH, CLASSES, M = "resnet8", 10, 3


# ----------------------------------------------------------------------------- reference

def _log_softmax(row, t):
    """log softmax(row / t) of one list of floats, with the max subtracted."""
    scaled = [v / t for v in row]
    top = max(scaled)
    lse = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - lse for v in scaled]


def _ce(z, y):
    """Mean cross-entropy of a B×C nested list against labels y."""
    return sum(-_log_softmax(row, 1.0)[label] for row, label in zip(z, y)) / len(z)


def _kl(zs, zt, t):
    """T² · (1/B) Σ_b Σ_c p_t (log p_t − log p_s), p = softmax(z / T)."""
    total = 0.0
    for row_s, row_t in zip(zs, zt):
        log_ps, log_pt = _log_softmax(row_s, t), _log_softmax(row_t, t)
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_ps, log_pt))
    return t * t * total / len(zs)


def reference_terms(branches, ensemble, mean, labels, t):
    m = len(branches)
    ce = _ce(ensemble, labels) + sum(_ce(z, labels) for z in branches)
    kd_ensemble = sum(_kl(z, ensemble, t) for z in branches)
    kd_mean = 0.0
    for j in range(m):
        kd_mean += sum(_kl(branches[j], mean[l], t) for l in range(m) if l != j) / (m - 1)
    return {"ce": ce, "kd_ensemble": kd_ensemble, "kd_mean": kd_mean}


def random_inputs(gen, b, c, m=M, scale=3.0):
    def logits():
        return (scale * torch.randn(b, c, generator=gen, dtype=torch.float64)).requires_grad_(True)
    branches = [logits() for _ in range(m)]
    ensemble = logits()
    mean = [logits() for _ in range(m)]
    labels = torch.randint(0, c, (b,), generator=gen)
    return branches, ensemble, mean, labels


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("seed", range(6))
def test_pcl_terms_match_plain_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    b = int(torch.randint(4, 9, (1,), generator=gen))
    c = int(torch.randint(5, 11, (1,), generator=gen))
    t = [1.0, 3.0, 4.0][seed % 3]
    branches, ensemble, mean, labels = random_inputs(gen, b, c)
    terms = pcl_terms(branches, ensemble, mean, labels, t)
    assert list(terms) == ["ce", "kd_ensemble", "kd_mean"]
    ref = reference_terms([z.tolist() for z in branches], ensemble.tolist(),
                          [z.tolist() for z in mean], labels.tolist(), t)
    for name, value in ref.items():
        assert terms[name].dtype == torch.float64 and terms[name].dim() == 0
        assert abs(terms[name].item() - value) <= 1e-10 * max(1.0, abs(value)), name


def test_total_is_ce_plus_w_times_both_kd_terms():
    """The runtime sums the named terms with the method's weights: ce + w·(kd_ens + kd_mean)."""
    gen = torch.Generator().manual_seed(11)
    branches, ensemble, mean, labels = random_inputs(gen, 6, 7)
    terms = pcl_terms(branches, ensemble, mean, labels, 3.0)
    w = 0.8 * rampup_weight(1.0, 30, 80)
    total = StepLoss(terms, {"kd_ensemble": w, "kd_mean": w}).total()
    expected = terms["ce"] + w * (terms["kd_ensemble"] + terms["kd_mean"])
    assert abs(total.item() - expected.item()) <= 1e-12


def test_no_gradient_reaches_the_targets_through_kd():
    gen = torch.Generator().manual_seed(3)
    branches, ensemble, mean, labels = random_inputs(gen, 5, 6)
    terms = pcl_terms(branches, ensemble, mean, labels, 3.0)
    (terms["kd_ensemble"] + terms["kd_mean"]).backward()
    assert ensemble.grad is None                       # z_e: no gradient through a KL term
    assert all(z.grad is None for z in mean)           # the EMA logits: never
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in branches)


def test_ensemble_gradient_comes_from_its_cross_entropy_only():
    gen = torch.Generator().manual_seed(4)
    branches, ensemble, mean, labels = random_inputs(gen, 8, 5)
    terms = pcl_terms(branches, ensemble, mean, labels, 3.0)
    (terms["ce"] + 2.5 * (terms["kd_ensemble"] + terms["kd_mean"])).backward()
    assert all(z.grad is None for z in mean)
    # d CE(z_e, y) / d z_e = (softmax(z_e) − onehot(y)) / B
    expected = (F.softmax(ensemble.detach(), 1) - F.one_hot(labels, 5).double()) / 8
    assert torch.allclose(ensemble.grad, expected, rtol=0, atol=1e-14)


def test_rampup_is_w_of_methods_md():
    """PCL's w(e) is ONE's ramp: exp(−5 (1 − min(e, 80)/80)²), times kd_weight."""
    for e in (0, 1, 40, 79, 80, 200):
        expected = math.exp(-5.0 * (1.0 - min(e, 80) / 80) ** 2)
        assert rampup_weight(1.0, e, 80) == pytest.approx(expected, rel=1e-15)
    assert rampup_weight(2.0, 40, 80) == pytest.approx(2.0 * math.exp(-1.25), rel=1e-15)


# ----------------------------------------------------------------------------- the EMA

def test_ema_decay_values():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == 0.5
    assert ema_decay(9) == pytest.approx(0.9, abs=1e-15)
    assert ema_decay(10000) == 0.999                    # 1 − 1/10001 > 0.999: capped
    assert ema_decay(10000, max_decay=0.99) == 0.99
    assert ema_decay(3, max_decay=0.99) == 0.75


def test_default_max_decay_spans_at_most_the_last_tenth_of_the_run():
    assert default_max_decay(110) == pytest.approx(1 - 10 / 110, abs=1e-15)
    assert default_max_decay(10_000) == 0.999 and default_max_decay(117_300) == 0.999
    assert default_max_decay(9_000) == pytest.approx(1 - 10 / 9_000, abs=1e-15)
    assert default_max_decay(10) == 0.0 and default_max_decay(3) == 0.0


@pytest.mark.parametrize("flags, want", [
    ({}, 1 - 10 / (5 * 22)),                                  # 1,438 // 64 = 22 steps an epoch
    ({"steps_per_epoch": 4}, 1 - 10 / (5 * 4)),
    ({"batch_size": 128}, 1 - 10 / (5 * 11)),
    ({"ema_decay": 0.999}, 0.999),                            # the paper's, as pcl-paper sets it
    ({"ema_decay": 0.5}, 0.5)])
def test_pcl_resolves_its_largest_decay_from_the_run_length(flags, want):
    method = Pcl(PclConfig(epochs=5, **flags))
    spec = DataSpec(10, 1, (0.5,), (0.2,), 1, flip=False, num_train=1438)
    method.setup(spec, torch.device("cpu"))
    assert method.max_decay == pytest.approx(want, abs=1e-15)


def _tiny_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double().requires_grad_(False)
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(model.parameters(), ema.parameters())):
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).view_as(p) + i)
            q.copy_(-2.0 * torch.ones_like(q))
    model.train()(torch.randn(4, 3, dtype=torch.float64))   # running stats move, nbt = 1
    model(torch.randn(4, 3, dtype=torch.float64))           # nbt = 2
    ema[1].running_mean.fill_(1.0)
    ema[1].running_var.fill_(4.0)
    return model, ema


def test_ema_update_matches_hand_computation():
    model, ema = _tiny_pair()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    storage = {k: v.data_ptr() for k, v in ema.state_dict().items()}
    ema_update(ema, model, step=3)                           # γ = 1 − 1/4 = 0.75
    after = ema.state_dict()
    # parameters: θ̃ ← 0.75 θ̃ + 0.25 θ
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        expected = 0.75 * before[key] + 0.25 * live[key]
        assert torch.allclose(after[key], expected, rtol=0, atol=1e-15), key
    assert float(after["0.weight"][0, 0]) == 0.75 * -2.0 + 0.25 * 0.0
    # floating buffers (BatchNorm running statistics) are averaged like the weights (the
    # current implementation's choice, see the module docstring); the counter is copied
    for key in ("1.running_mean", "1.running_var"):
        expected = 0.75 * before[key] + 0.25 * live[key]
        assert torch.allclose(after[key], expected, rtol=0, atol=1e-15), key
    assert int(after["1.num_batches_tracked"]) == 2
    # in place, no graph, the live model untouched
    assert {k: v.data_ptr() for k, v in after.items()} == storage
    assert all(p.grad_fn is None and p.grad is None for p in ema.parameters())
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    ema_update(ema, model, step=3, max_decay=0.5)            # γ = min(0.75, 0.5)
    assert float(ema.state_dict()["0.weight"][0, 0]) == 0.5 * (0.75 * -2.0) + 0.5 * 0.0


def test_ema_update_first_step_copies_and_is_deterministic():
    model, ema = _tiny_pair()
    ema_update(ema, model, step=0)                           # γ = 0: the mean is the network
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(),
                                                 model.state_dict().values()))
    model2, ema2 = _tiny_pair()
    model3, ema3 = _tiny_pair()
    for s in range(1, 5):
        ema_update(ema2, model2, s)
        ema_update(ema3, model3, s)
    assert all(torch.equal(a, b) for a, b in zip(ema2.state_dict().values(),
                                                 ema3.state_dict().values()))


# ----------------------------------------------------------------------------- the network

@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_pcl(ARCH, CLASSES, branches=M, in_channels=3)


def _views(seed, b=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=gen) for _ in range(M)]


def test_pclnet_structure(net):
    assert isinstance(net, PclNet) and net.num_branches == M and len(net.branches) == M
    d = build_model(ARCH, CLASSES, 3).classifier.in_features
    assert net.ensemble.in_features == M * d and net.ensemble.out_features == CLASSES
    # the branch copies are re-initialised, not clones of branch 0
    w0 = net.branches[0].classifier.weight
    assert not any(torch.equal(w0, b.classifier.weight) for b in net.branches[1:])


def test_pclnet_forward_views_and_single_tensor(net):
    net.eval()
    views = _views(1)
    with torch.no_grad():
        logits, ensemble = net(views)
        assert len(logits) == M and all(z.shape == (2, CLASSES) for z in logits)
        assert ensemble.shape == (2, CLASSES)
        # branch j reads its own view: same as the single-tensor forward on view j
        for j in range(M):
            single, _ = net(views[j])
            assert torch.allclose(logits[j], single[j], rtol=0, atol=1e-6)
        # the ensemble is the Linear head on the concatenated pooled features
        pooled = [global_pool(br.last_stage(net.trunk(v))) for br, v in zip(net.branches, views)]
        assert torch.allclose(ensemble, net.ensemble(torch.cat(pooled, 1)), rtol=0, atol=1e-6)
        single, ens_single = net(views[0])
        assert len(single) == M and all(z.shape == (2, CLASSES) for z in single)
        assert ens_single.shape == (2, CLASSES)
    with pytest.raises(ValueError):
        net(views[:2])
    net.train()
    logits, ensemble = net(_views(2))                      # train mode, with graph
    (sum(z.sum() for z in logits) + ensemble.sum()).backward()
    assert net.ensemble.weight.grad is not None
    net.zero_grad(set_to_none=True)


def test_export_branch_loads_strictly_and_matches(net):
    net.eval()
    x = _views(5)[0]
    with torch.no_grad():
        logits, _ = net(x)
    for j in range(M):
        state = net.branch_state_dict(j)
        plain = build_model(ARCH, CLASSES, 3)
        plain.load_state_dict(state, strict=True)            # no ensemble/other-branch keys
        exported = net.export_branch(j)
        assert not exported.training
        with torch.no_grad():
            assert torch.allclose(exported(x), logits[j], rtol=0, atol=1e-6)
            assert torch.allclose(plain.eval()(x), logits[j], rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        net.branch_state_dict(M)


@pytest.mark.parametrize("branches", [1, 0])
def test_fewer_than_two_branches_refused(branches):
    with pytest.raises(ValueError, match="branches"):
        PclNet(ARCH, CLASSES, branches=branches)


def test_pcl_learns_on_digits_and_exports_a_mean_network_branch(tmp_path):
    """In this process (the loop Ray Train's workers run): live branches, the temporal mean
    network and the peer ensemble learn; best_student.pt, chosen on validation, is a mean
    network branch that reproduces its row's test accuracy; the report covers the run."""
    from cohort.data import load_dataset, normalize_batch
    from cohort.methods.pcl import PclConfig
    from cohort.models.registry import build_model
    from cohort.report import write_report
    from cohort.runs import load_checkpoint_file
    from cohort.runtime import run

    data = load_dataset("digits", val_fraction=0.1)
    cfg = PclConfig(arch="resnet8", branches=3, dataset="digits", epochs=4, batch_size=64,
                    lr=0.1, schedule="cosine", rampup_epochs=2, val_fraction=0.1,
                    runtime="local", device="cpu", progress=False, output=str(tmp_path / "pcl"))
    summary = run(cfg, data)
    final = {m: e["final_test_acc"] for m, e in summary["members"].items()}
    assert min(final[f"branch{i}"] for i in range(3)) >= 85.0 and final["ensemble"] >= 85.0, final
    assert min(final[f"ema{i}"] for i in range(3)) >= 75.0, final
    best = summary["best_student"]
    assert best["member"].startswith("ema") and "val_acc" in best["selection"]
    exported = load_checkpoint_file(tmp_path / "pcl" / "best_student.pt")
    model = build_model(exported["arch"], exported["num_classes"], exported["in_channels"])
    model.load_state_dict(exported["model"], strict=True)
    with torch.no_grad():
        logits = model.eval()(normalize_batch(data.test_images, mean=data.mean, std=data.std))
    acc = 100.0 * (logits.argmax(1) == data.test_labels).float().mean().item()
    assert acc == pytest.approx(best["test_acc"], abs=1e-6)
    report = write_report(tmp_path / "pcl")[0].read_text()
    assert "ema0" in report and "best means: the epoch with the best val_acc" in report

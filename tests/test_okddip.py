"""OKDDip: the attention, targets and loss against plain-loop float64 references, the KD
gradient into W_Q / W_K through a tiny net, the exported leader, and the branch count check."""
import math

import pytest
import torch

from cohort.losses import soft_kl
from cohort.methods.okddip import (OKDDIP_TERMS, okddip_attention, okddip_kl, okddip_loss,
                                   okddip_targets, okddip_total, rampup)
from cohort.models.okddip import OkddipNet, build_okddip
from cohort.models.registry import build_model

TOL = dict(rtol=0.0, atol=1e-10)
SHAPES = [(4, 5), (6, 7), (8, 10)]   # (B, C)
P = 3


# ----------------------------------------------------------------------------- references

def ref_attention(q, k):
    """α[i][a][b] = exp(q_a·k_b) / Σ_c exp(q_a·k_c), one sample, one pair at a time."""
    bsz, p, dim = q.shape
    out = torch.zeros(bsz, p, p, dtype=torch.float64)
    for i in range(bsz):
        for a in range(p):
            energies = []
            for b in range(p):
                energies.append(sum(q[i, a, j] * k[i, b, j] for j in range(dim)))
            top = max(float(e.detach()) for e in energies)
            exps = [torch.exp(e - top) for e in energies]
            total = sum(exps)
            for b in range(p):
                out[i, a, b] = exps[b] / total
    return out


def ref_targets(peers, alpha):
    bsz, num_classes = peers[0].shape
    p = len(peers)
    targets = []
    for a in range(p):
        t = torch.zeros(bsz, num_classes, dtype=torch.float64)
        for i in range(bsz):
            for c in range(num_classes):
                t[i, c] = sum(alpha[i, a, b] * peers[b][i, c] for b in range(p))
        targets.append(t)
    leader = torch.zeros(bsz, num_classes, dtype=torch.float64)
    for i in range(bsz):
        for c in range(num_classes):
            leader[i, c] = sum(peers[b][i, c] for b in range(p)) / p
    return targets, leader


def ref_log_softmax(row):
    top = max(float(v.detach()) for v in row)
    log_total = top + torch.log(sum(torch.exp(v - top) for v in row))
    return [v - log_total for v in row]


def ref_kl(student, target, temperature):
    """T² · (1/B) Σ_i Σ_c p_t (log p_t − log p_s), no detach."""
    bsz, num_classes = student.shape
    total = 0.0
    for i in range(bsz):
        log_ps = ref_log_softmax([student[i, c] / temperature for c in range(num_classes)])
        log_pt = ref_log_softmax([target[i, c] / temperature for c in range(num_classes)])
        for c in range(num_classes):
            total = total + torch.exp(log_pt[c]) * (log_pt[c] - log_ps[c])
    return temperature ** 2 * total / bsz


def ref_ce(z, labels):
    bsz, num_classes = z.shape
    total = 0.0
    for i in range(bsz):
        total = total - ref_log_softmax([z[i, c] for c in range(num_classes)])[int(labels[i])]
    return total / bsz


def ref_loss(branches, alpha, labels, temperature, kd_weight):
    peers, leader = branches[:-1], branches[-1]
    targets, leader_target = ref_targets(peers, alpha)
    ce = sum(ref_ce(z, labels) for z in peers) + ref_ce(leader, labels)
    kd_peers = sum(ref_kl(z, t, temperature) for z, t in zip(peers, targets))
    kd_leader = ref_kl(leader, leader_target, temperature)
    return {"ce": ce, "kd_peers": kd_peers, "kd_leader": kd_leader,
            "total": ce + kd_weight * (kd_peers + kd_leader)}


def random_case(seed, bsz, num_classes, dim=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, P, dim, generator=g, dtype=torch.float64)
    k = torch.randn(bsz, P, dim, generator=g, dtype=torch.float64)
    branches = [3.0 * torch.randn(bsz, num_classes, generator=g, dtype=torch.float64)
                for _ in range(P + 1)]
    labels = torch.randint(0, num_classes, (bsz,), generator=g)
    return q, k, branches, labels


# ----------------------------------------------------------------------------- the math

@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_attention_matches_reference_and_rows_sum_to_one(seed, shape):
    q, k, _, _ = random_case(seed, *shape)
    alpha = okddip_attention(q, k)
    assert alpha.shape == (shape[0], P, P)
    torch.testing.assert_close(alpha, ref_attention(q, k), **TOL)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(shape[0], P, dtype=torch.float64), **TOL)
    assert (alpha > 0).all()
    # b = a is included and there is no 1/sqrt(d) scaling: scaling q scales the energies.
    assert not torch.allclose(okddip_attention(2.0 * q, k), alpha)


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_targets_match_reference(seed, shape):
    q, k, branches, _ = random_case(10 + seed, *shape)
    alpha = okddip_attention(q, k)
    targets, leader = okddip_targets(branches[:-1], alpha)
    ref, ref_leader = ref_targets(branches[:-1], alpha)
    assert len(targets) == P
    for t, r in zip(targets, ref):
        torch.testing.assert_close(t, r, **TOL)
    torch.testing.assert_close(leader, ref_leader, **TOL)


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
def test_loss_terms_match_reference(seed, shape):
    q, k, branches, labels = random_case(20 + seed, *shape)
    alpha = okddip_attention(q, k)
    terms = okddip_loss(branches, alpha, labels, temperature=3.0, kd_weight=0.7)
    ref = ref_loss(branches, alpha, labels, 3.0, 0.7)
    assert set(terms) == set(OKDDIP_TERMS) | {"total"}
    for name in ref:
        torch.testing.assert_close(terms[name], torch.as_tensor(ref[name], dtype=torch.float64),
                                   **TOL, msg=name)
    torch.testing.assert_close(okddip_total(terms, 0.7), terms["total"], **TOL)
    # Value-wise the local KL is soft_kl (which differs only in detaching its target).
    torch.testing.assert_close(okddip_kl(branches[0], branches[1], 2.0),
                               soft_kl(branches[0], branches[1], 2.0), **TOL)


def test_gradients_match_reference_targets_not_detached():
    """The gradient of the KD terms reaches q, k (via α) and every logit through the targets,
    and equals the non-detached reference's gradient."""
    q, k, branches, labels = random_case(30, 5, 6)
    leaves = [q, k] + branches
    for x in leaves:
        x.requires_grad_(True)
    terms = okddip_loss(branches, okddip_attention(q, k), labels, 3.0, 1.0)
    got = torch.autograd.grad(terms["kd_peers"] + terms["kd_leader"], leaves)
    ref = ref_loss(branches, ref_attention(q, k), labels, 3.0, 1.0)
    want = torch.autograd.grad(ref["kd_peers"] + ref["kd_leader"], leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    # The leader's KL alone reaches the peers (its target, the peer mean, is not detached).
    peer_grads = torch.autograd.grad(
        okddip_loss(branches, okddip_attention(q, k), labels)["kd_leader"], branches[:-1])
    assert all(g.abs().sum() > 0 for g in peer_grads)


def test_rampup():
    assert rampup(0) == pytest.approx(math.exp(-5.0))
    assert rampup(40) == pytest.approx(math.exp(-5.0 * 0.25))
    assert rampup(80) == 1.0 and rampup(200) == 1.0
    assert rampup(5, rampup_epochs=10) == pytest.approx(math.exp(-1.25))


# ----------------------------------------------------------------------------- the network

def tiny_net(branches=4):
    torch.manual_seed(0)
    return build_okddip("resnet8", 10, branches, in_channels=3)


def test_net_kd_term_alone_trains_query_and_key():
    net = tiny_net()
    x = torch.randn(4, 3, 16, 16)
    labels = torch.randint(0, 10, (4,))
    logits, queries, keys = net(x)
    d = net.feature_channels
    assert len(logits) == 4 and all(z.shape == (4, 10) for z in logits)
    assert queries.shape == keys.shape == (4, 3, d // 8)
    assert net.query.weight.shape == net.key.weight.shape == (d // 8, d)
    assert net.query.bias is None and net.key.bias is None
    alpha = okddip_attention(queries, keys)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4, 3))
    terms = okddip_loss(logits, alpha, labels, temperature=3.0, kd_weight=1.0)
    (terms["kd_peers"] + terms["kd_leader"]).backward()   # CE left out entirely
    assert net.query.weight.grad is not None and net.query.weight.grad.abs().sum() > 0
    assert net.key.weight.grad is not None and net.key.weight.grad.abs().sum() > 0


def test_exported_leader_matches_leader_branch():
    net = tiny_net()
    net.train()
    net(torch.randn(8, 3, 8, 8))      # move BN running statistics away from their init
    net.eval()
    leader = net.leader_index
    assert leader == 3
    plain = build_model("resnet8", 10, 3)
    plain.load_state_dict(net.branch_state_dict(leader), strict=True)
    exported = net.export_leader()
    assert not exported.training
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = net(x)[0][leader]
        torch.testing.assert_close(exported(x), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(plain.eval()(x), want, rtol=0, atol=1e-6)
        # Branches differ (independent initialisation), so the leader is really branch m-1.
        assert not torch.allclose(net.export_branch(0)(x), want)


@pytest.mark.parametrize("branches", [0, 1, 2])
def test_fewer_than_three_branches_refused(branches):
    with pytest.raises(ValueError, match="branches"):
        OkddipNet("resnet8", 10, branches)


def test_okddip_learns_on_digits_and_exports_the_leader(tmp_path, digits):
    """In this process (the loop Ray Train's workers run): peers, leader and ensemble learn;
    best_student.pt is the leader, chosen without the test set."""
    from cohort.methods.okddip import OkddipConfig
    from cohort.runtime import run
    cfg = OkddipConfig(arch="resnet8", branches=4, dataset="digits", epochs=4, batch_size=64,
                       lr=0.1, schedule="cosine", rampup_epochs=2, runtime="local", device="cpu",
                       progress=False, output=str(tmp_path / "okddip"))
    summary = run(cfg, digits)
    final = {m: e["final_test_acc"] for m, e in summary["members"].items()}
    assert set(final) == {"branch0", "branch1", "branch2", "branch3", "ensemble"}
    assert min(final.values()) >= 88.0, final
    best = summary["best_student"]
    assert (best["member"], best["epoch"]) == ("branch3", 3) and "final epoch" in best["selection"]
    assert best["test_acc"] == pytest.approx(final["branch3"])

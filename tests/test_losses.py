"""Tests for cohort.losses against independent float64 references written out by hand."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cohort import losses as L


# ----------------------------------------------------------------------------- references
# Written with explicit Python loops over floats, never calling the code under test.

def _log_softmax_row(row, t=1.0):
    s = [v / t for v in row]
    m = max(s)
    lse = m + math.log(sum(math.exp(v - m) for v in s))
    return [v - lse for v in s]


def ref_ce(z, y):
    z, y = z.tolist(), y.tolist()
    return sum(-_log_softmax_row(row)[yb] for row, yb in zip(z, y)) / len(z)


def ref_ce_rows(z, y):
    return [-_log_softmax_row(row)[yb] for row, yb in zip(z.tolist(), y.tolist())]


def ref_soft_kl(zs, zt, t):
    total = 0.0
    rows_s, rows_t = zs.tolist(), zt.tolist()
    for rs, rt in zip(rows_s, rows_t):
        ls, lt = _log_softmax_row(rs, t), _log_softmax_row(rt, t)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return t * t * total / len(rows_s)


def leaf(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)


def labels(b, c, seed=0):
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


def assert_no_grad(t):
    assert t.grad is None or torch.count_nonzero(t.grad) == 0


def assert_has_grad(t):
    assert t.grad is not None and torch.count_nonzero(t.grad) > 0


# ----------------------------------------------------------------------------- old linear solver
# Test-only reference: cohort.losses.kdcl_linear_weights as it was before it moved to torch on
# the logits' device (numpy projected Newton with an active-set QP, float64 on the CPU), kept
# verbatim apart from names so the torch solver can be compared against it.

_REF_LINEAR_MAX_NEWTON = 30
_REF_LINEAR_TOL = 1e-16
_REF_LINEAR_MAX_HALVINGS = 30
_REF_QP_MAX_ITER = 64


def _ref_project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {a ≥ 0, Σ a = 1} (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _ref_simplex_qp(H: np.ndarray, c: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Exact primal active-set solve of ``min ½ x'Hx + c'x`` s.t. ``x ≥ 0, Σ x = 1``.

    ``H`` must be symmetric positive definite (the caller adds a ridge); ``x0`` feasible.
    (Nocedal & Wright, Numerical Optimization, Alg. 16.3.)
    """
    k = c.size
    x = x0.copy()
    active = x <= 0.0
    x[active] = 0.0
    for _ in range(_REF_QP_MAX_ITER):
        free = np.flatnonzero(~active)
        n = free.size
        grad = H @ x + c
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = H[np.ix_(free, free)]
        kkt[:n, n] = 1.0
        kkt[n, :n] = 1.0
        rhs = np.zeros(n + 1)
        rhs[:n] = -grad[free]
        try:
            sol = np.linalg.solve(kkt, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
        p, nu = sol[:n], sol[n]
        if np.max(np.abs(p)) <= 1e-14 * max(1.0, np.max(np.abs(x))):
            # Stationary on this face: bound multipliers λ_i = grad_i + ν must be ≥ 0.
            lam = np.where(active, grad + nu, np.inf)
            j = int(np.argmin(lam))
            if not active.any() or lam[j] >= -1e-14 * max(1.0, np.max(np.abs(grad))):
                break
            active[j] = False
            continue
        step, blocking = 1.0, -1
        for i, pi in zip(free, p):
            if pi < 0.0:
                r = -x[i] / pi
                if r < step:
                    step, blocking = r, int(i)
        x[free] += step * p
        if blocking >= 0:
            active[blocking] = True
            x[blocking] = 0.0
        np.maximum(x, 0.0, out=x)
        if k - active.sum() < 1:  # never reached in exact arithmetic; keep feasible
            return _ref_project_simplex(x0)
    return x / x.sum()


def _ref_kdcl_linear_weights(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """KDCL-linear weights ``a = argmin_{a ∈ simplex} CE(Σ_k a_k z_k, y)`` (float64, CPU, K,).

    Convex in ``a``; solved by a deterministic projected Newton method in float64: start at
    the best of the uniform average and the K single students, then at most
    ``_REF_LINEAR_MAX_NEWTON`` steps, each minimising the exact quadratic model (Hessian plus a
    1e-10 relative ridge) over the simplex with an active-set solver, followed by Armijo
    backtracking; stops once the Newton decrement is below ``_REF_LINEAR_TOL``. Every step is
    monotone, so ``CE(result) ≤ min(CE(uniform), CE(z_k) for all k)``. Same inputs →
    bit-identical weights.
    """
    members = L._stack_members("logits", logits)
    k = len(members)
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        z = torch.stack([m.detach() for m in members]).to("cpu", torch.float64)  # K×B×C
        y = labels.detach().to("cpu", torch.long)
        _, b, c = z.shape
        zf = z.reshape(k, b * c)
        zy = z.gather(2, y.view(1, b, 1).expand(k, b, 1)).squeeze(2)  # K×B
        zy_sum = zy.sum(1)

        def ce(a: torch.Tensor) -> float:
            s = (a @ zf).view(b, c)
            return float((torch.logsumexp(s, 1).sum() - a @ zy_sum) / b)

        # Start: the best of uniform and every single student (a vertex).
        ce_single = (torch.logsumexp(z, 2) - zy).mean(1)  # K
        uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
        f = ce(uniform)
        a = uniform
        best = int(torch.argmin(ce_single))
        if float(ce_single[best]) < f:
            f = float(ce_single[best])
            a = torch.zeros(k, dtype=torch.float64)
            a[best] = 1.0

        for _ in range(_REF_LINEAR_MAX_NEWTON):
            s = (a @ zf).view(b, c)
            p = torch.softmax(s, 1)
            pz = z * p                                  # K×B×C
            m = pz.sum(2)                               # K×B: E_p[z_k]
            g = (m - zy).mean(1)                        # ∇ CE
            h = (pz.reshape(k, b * c) @ zf.T - m @ m.T) / b   # ∇² CE (PSD)
            h_np, g_np, a_np = h.numpy(), g.numpy(), a.numpy()
            h_np = 0.5 * (h_np + h_np.T)
            ridge = 1e-10 * max(float(np.trace(h_np)) / k, 1e-12)
            h_np = h_np + ridge * np.eye(k)
            x = _ref_simplex_qp(h_np, g_np - h_np @ a_np, a_np)
            d = x - a_np
            slope = float(g_np @ d)
            if not slope < -_REF_LINEAR_TOL:
                break
            t, accepted = 1.0, False
            for _ in range(_REF_LINEAR_MAX_HALVINGS):
                cand = torch.from_numpy(np.maximum(a_np + t * d, 0.0))
                cand = cand / cand.sum()
                f_new = ce(cand)
                if f_new <= f + 1e-4 * t * slope:
                    accepted = True
                    break
                t *= 0.5
            if not accepted or not f_new < f:
                break
            a, f = cand, f_new
        return a.clone()


# ----------------------------------------------------------------------------- soft_kl

@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_soft_kl_matches_formula(t):
    zs, zt = leaf(5, 7, seed=1), leaf(5, 7, seed=2)
    got = L.soft_kl(zs, zt, t)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_soft_kl(zs, zt, t), rel=1e-10, abs=1e-12)


def test_soft_kl_float32_close_to_float64():
    zs, zt = leaf(6, 10, seed=3), leaf(6, 10, seed=4)
    got = L.soft_kl(zs.detach().float(), zt.detach().float(), 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_soft_kl(zs, zt, 2.0), rel=1e-5)


def test_soft_kl_zero_for_identical_and_positive_otherwise():
    z = leaf(4, 6, seed=5)
    assert L.soft_kl(z, z.detach().clone(), 3.0).item() == pytest.approx(0.0, abs=1e-12)
    assert L.soft_kl(z, leaf(4, 6, seed=6), 3.0).item() > 1e-3


def test_soft_kl_t_squared_scaling():
    zs, zt = leaf(4, 6, seed=7).detach(), leaf(4, 6, seed=8).detach()
    base = L.soft_kl(zs, zt, 1.0).item()
    for t in (2.0, 5.0):
        # softmax(T z / T) = softmax(z): the only change is the T² factor.
        assert L.soft_kl(t * zs, t * zt, t).item() == pytest.approx(t * t * base, rel=1e-10)
    # Large-T limit: T²·KL → (1/2B) Σ_b (1/C) Σ_c (Δ_bc − mean_c Δ_b)², Δ = z_s − z_t.
    d = (zs - zt).tolist()
    limit = sum(sum((v - sum(r) / len(r)) ** 2 for v in r) / len(r) for r in d) / (2 * len(d))
    assert L.soft_kl(zs, zt, 1000.0).item() == pytest.approx(limit, rel=1e-2)


def test_soft_kl_gradient_only_to_student_and_analytic():
    zs, zt, t = leaf(3, 5, seed=9), leaf(3, 5, seed=10), 2.5
    L.soft_kl(zs, zt, t).backward()
    assert_no_grad(zt)
    assert_has_grad(zs)
    # d/dz_s [T² KL] = T (p_s − p_t) / B
    expected = t * (F.softmax(zs.detach() / t, 1) - F.softmax(zt.detach() / t, 1)) / 3
    torch.testing.assert_close(zs.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "x", None])
def test_temperature_must_be_positive(bad):
    z = leaf(2, 3)
    with pytest.raises(ValueError):
        L.soft_kl(z, z, bad)
    with pytest.raises(ValueError):
        L.one_loss([z, z], torch.full((2, 2), 0.5, dtype=torch.float64), labels(2, 3), bad)


def test_soft_kl_shape_mismatch():
    with pytest.raises(ValueError):
        L.soft_kl(leaf(2, 3), leaf(2, 4), 1.0)


# ----------------------------------------------------------------------------- KD

@pytest.mark.parametrize("alpha,t", [(0.9, 4.0), (0.3, 1.0)])
def test_kd_loss_matches_formula_and_teacher_gets_no_grad(alpha, t):
    zs, zt, y = leaf(6, 5, seed=11), leaf(6, 5, seed=12), labels(6, 5, seed=1)
    got = L.kd_loss(zs, zt, y, t, alpha)
    want = (1 - alpha) * ref_ce(zs, y) + alpha * ref_soft_kl(zs, zt, t)
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert_no_grad(zt)
    assert_has_grad(zs)


def test_kd_alpha_limits():
    zs, zt, y = leaf(6, 5, seed=13), leaf(6, 5, seed=14), labels(6, 5, seed=2)
    assert L.kd_loss(zs, zt, y, 4.0, 0.0).item() == pytest.approx(ref_ce(zs, y), rel=1e-12)
    assert L.kd_loss(zs, zt, y, 4.0, 1.0).item() == pytest.approx(
        ref_soft_kl(zs, zt, 4.0), rel=1e-10)
    with pytest.raises(ValueError):
        L.kd_loss(zs, zt, y, 4.0, 1.5)


# ----------------------------------------------------------------------------- DML

def test_dml_loss_matches_formula_and_peers_get_no_grad():
    z = leaf(5, 4, seed=15)
    peers = [leaf(5, 4, seed=16 + i) for i in range(3)]
    y, t, lam = labels(5, 4, seed=3), 2.0, 0.7
    got = L.dml_loss(z, peers, y, t, lam)
    want = ref_ce(z, y) + lam * sum(ref_soft_kl(z, p, t) for p in peers) / 3
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert_has_grad(z)
    for p in peers:
        assert_no_grad(p)


def test_dml_defaults_are_paper_values():
    z, p, y = leaf(4, 3, seed=20), leaf(4, 3, seed=21), labels(4, 3)
    assert L.dml_loss(z, [p], y).item() == pytest.approx(
        ref_ce(z, y) + ref_soft_kl(z, p, 1.0), rel=1e-10)
    with pytest.raises(ValueError):
        L.dml_loss(z, [], y)


# ----------------------------------------------------------------------------- KDCL teacher

def test_kdcl_naive_picks_lowest_ce_student_per_sample():
    y = torch.tensor([0, 1, 2])
    z1 = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    z3 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    # By hand: sample 0 → z1 (5 on class 0), sample 1 → z2, sample 2 → z3.
    zt = L.kdcl_teacher([z1, z2, z3], y, "naive")
    torch.testing.assert_close(zt, torch.stack([z1[0], z2[1], z3[2]]), rtol=0, atol=0)


def test_kdcl_naive_random_against_loop_and_detached():
    zs = [leaf(8, 5, seed=30 + k) for k in range(4)]
    y = labels(8, 5, seed=4)
    zt = L.kdcl_teacher(zs, y, "naive")
    assert not zt.requires_grad
    rows = [ref_ce_rows(z, y) for z in zs]
    for b in range(8):
        best = min(range(4), key=lambda k: rows[k][b])
        assert torch.equal(zt[b], zs[best][b].detach())


def test_kdcl_minlogit():
    zs = [leaf(6, 5, seed=40 + k) for k in range(3)]
    y = labels(6, 5, seed=5)
    zt = L.kdcl_teacher(zs, y, "minlogit")
    assert not zt.requires_grad
    assert zt.shape == (6, 5)
    rows = [z.tolist() for z in zs]
    for b, yb in enumerate(y.tolist()):
        assert zt[b, yb].item() == 0.0
        for c in range(5):
            shifted = [rows[k][b][c] - rows[k][b][yb] for k in range(3)]
            assert zt[b, c].item() == pytest.approx(min(shifted), abs=1e-12)
            assert all(zt[b, c].item() <= s + 1e-12 for s in shifted)


def _ce64(z, y):
    return F.cross_entropy(z.double(), y).item()


def _recover_weights(zs, zt):
    """Least-squares a with Σ a_k z_k = z_t (exact when z_t is such a combination)."""
    a = np.stack([z.detach().double().reshape(-1).numpy() for z in zs], 1)
    w, *_ = np.linalg.lstsq(a, zt.double().reshape(-1).numpy(), rcond=None)
    return w


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (4, 2), (8, 3)])
def test_kdcl_linear_simplex_and_beats_members_and_uniform(k, seed):
    b, c = 32, 10
    g = torch.Generator().manual_seed(seed)
    y = labels(b, c, seed=seed)
    onehot = F.one_hot(y, c).double()
    zs = [((1 + k_) * torch.randn(b, c, generator=g, dtype=torch.float64)
           + (3.0 - 0.3 * k_) * onehot).requires_grad_(True) for k_ in range(k)]
    zt = L.kdcl_teacher(zs, y, "linear")
    assert not zt.requires_grad and zt.shape == (b, c)
    w = _recover_weights(zs, zt)
    np.testing.assert_allclose(zt.numpy(), sum(wk * z.detach().numpy() for wk, z in zip(w, zs)),
                               atol=1e-9)
    assert w.sum() == pytest.approx(1.0, abs=1e-8)
    assert (w >= -1e-8).all()
    np.testing.assert_allclose(w, L.kdcl_linear_weights(zs, y).numpy(), atol=1e-7)
    ce_t = _ce64(zt, y)
    for z in zs:
        assert ce_t <= _ce64(z.detach(), y) + 1e-12
    assert ce_t <= _ce64(sum(z.detach() for z in zs) / k, y) + 1e-12
    # Optimal (KKT on the simplex): with g = ∇_a CE(Σ a_k z_k, y), every used student has
    # the smallest gradient component, and no unused one has a smaller one.
    a = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    stacked = torch.stack([z.detach() for z in zs])
    (grad,) = torch.autograd.grad(F.cross_entropy(torch.einsum("k,kbc->bc", a, stacked), y), a)
    grad = grad.numpy()
    used = w > 1e-6
    assert used.any()
    assert grad[used].max() - grad.min() < 1e-7
    # Near-optimal: no point of a simplex grid does better (K ≤ 3 only, grid step 1/50).
    if k <= 3:
        steps = 50
        grid = [list(ii) + [steps - sum(ii)]
                for ii in itertools.product(range(steps + 1), repeat=k - 1) if sum(ii) <= steps]
        a_grid = torch.tensor(grid, dtype=torch.float64) / steps             # G×K
        z_grid = torch.einsum("gk,kbc->gbc", a_grid, stacked)                # G×B×C
        ce_grid = (torch.logsumexp(z_grid, 2)
                   - z_grid.gather(2, y.view(1, b, 1).expand(len(grid), b, 1)).squeeze(2)).mean(1)
        assert ce_t <= ce_grid.min().item() + 1e-10


def test_kdcl_linear_optimum_at_a_vertex_and_on_an_edge():
    b, c = 16, 5
    y = labels(b, c, seed=7)
    onehot = F.one_hot(y, c).double()
    good = 10.0 * onehot
    wrong = 10.0 * F.one_hot((y + 1) % c, c).double()
    # One student confidently right, the other confidently wrong → a = (1, 0).
    w = L.kdcl_linear_weights([good, wrong], y)
    np.testing.assert_allclose(w.numpy(), [1.0, 0.0], atol=1e-9)
    w = L.kdcl_linear_weights([wrong, good, wrong.roll(1, 1)], y)
    assert w[1].item() == pytest.approx(1.0, abs=1e-9)
    # Two complementary students (each right on its half, flat on the other) and a wrong
    # one: by symmetry and convexity the optimum is on the edge a = (½, ½, 0).
    half = torch.arange(b) < b // 2
    z1 = good * half.view(-1, 1)
    z2 = good * (~half).view(-1, 1)
    w = L.kdcl_linear_weights([z1, z2, wrong], y)
    np.testing.assert_allclose(w.numpy(), [0.5, 0.5, 0.0], atol=1e-7)


def test_kdcl_linear_identical_students_no_nan():
    z = leaf(8, 4, seed=50).detach()
    y = labels(8, 4, seed=8)
    w = L.kdcl_linear_weights([z, z.clone(), z.clone()], y)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(L.kdcl_teacher([z, z.clone()], y, "linear"), z)


def test_kdcl_linear_is_deterministic():
    """The same logits give bit-identical weights and teacher every call. (Its speed target,
    < 5 ms for K=4, B=128, C=100, is measured in benchmarks/, not asserted on a busy CI box.)"""
    g = torch.Generator().manual_seed(11)
    zs = [torch.randn(128, 100, generator=g) * (1 + k) for k in range(4)]
    y = torch.randint(0, 100, (128,), generator=g)
    first = L.kdcl_teacher(zs, y, "linear")
    for _ in range(3):
        assert torch.equal(L.kdcl_teacher(zs, y, "linear"), first)
    assert torch.equal(L.kdcl_linear_weights(zs, y), L.kdcl_linear_weights(zs, y))


def test_kdcl_general_teacher_and_errors():
    zs = [leaf(4, 3, seed=60 + k) for k in range(3)]
    y = labels(4, 3, seed=9)
    w = [0.5, 0.3, 0.2]
    zt = L.kdcl_teacher(zs, y, "general", w)
    assert not zt.requires_grad
    want = [[sum(w[k] * zs[k][b, c].item() for k in range(3)) for c in range(3)] for b in range(4)]
    np.testing.assert_allclose(zt.numpy(), want, rtol=1e-12)
    torch.testing.assert_close(L.kdcl_teacher(zs, y, "general", torch.tensor(w)), zt)
    with pytest.raises(ValueError):
        L.kdcl_teacher(zs, y, "general")
    with pytest.raises(ValueError):
        L.kdcl_teacher(zs, y, "general", [0.5, 0.5])
    with pytest.raises(ValueError, match="naive.*linear.*minlogit.*general"):
        L.kdcl_teacher(zs, y, "mean")


@pytest.mark.parametrize("variant", ["naive", "minlogit", "linear"])
def test_kdcl_teacher_float32_keeps_dtype(variant):
    zs = [leaf(4, 3, seed=70 + k).detach().float() for k in range(2)]
    zt = L.kdcl_teacher(zs, labels(4, 3), variant)
    assert zt.dtype == torch.float32 and zt.shape == (4, 3)


# ----------------------------------------------------------------------------- KDCL general weights

def _ref_cov(probs, y):
    k, n, c = len(probs), len(y), probs[0].shape[1]
    p = [q.tolist() for q in probs]
    ys = y.tolist()
    cm = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            s = 0.0
            for b in range(n):
                for cc in range(c):
                    oh = 1.0 if cc == ys[b] else 0.0
                    s += (p[i][b][cc] - oh) * (p[j][b][cc] - oh)
            cm[i][j] = s / n
    return cm


def test_kdcl_general_weights_two_students_closed_form():
    y = torch.tensor([0, 1])
    p1 = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    p2 = torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)
    cm = _ref_cov([p1, p2], y)
    # By hand: residuals p1 − y: (−.1, .1), (.4, −.4); p2 − y: (−.4, .4), (.2, −.2), so
    # C11 = 0.17, C22 = 0.20, C12 = 0.12 and w1 = (C22 − C12)/(C11 + C22 − 2 C12) = 8/13.
    assert cm[0][0] == pytest.approx(0.17) and cm[1][1] == pytest.approx(0.20)
    assert cm[0][1] == pytest.approx(0.12)
    w1 = (cm[1][1] - cm[0][1]) / (cm[0][0] + cm[1][1] - 2 * cm[0][1])
    assert w1 == pytest.approx(8 / 13)
    w = L.kdcl_general_weights([p1, p2], y)
    assert w.shape == (2,) and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), [w1, 1 - w1], rtol=1e-6)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_kdcl_general_weights_random_against_lagrange_solution():
    g = torch.Generator().manual_seed(3)
    probs = [F.softmax(torch.randn(20, 4, generator=g, dtype=torch.float64) * 2, 1)
             for _ in range(3)]
    y = torch.randint(0, 4, (20,), generator=g)
    cm = np.array(_ref_cov(probs, y))
    u = np.linalg.solve(cm, np.ones(3))
    w = L.kdcl_general_weights(probs, y).numpy()
    np.testing.assert_allclose(w, u / u.sum(), rtol=1e-5)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    # It minimises w'Cw among weights summing to one.
    for d in ([1, -1, 0], [0, 1, -1], [1, 0, -1]):
        v = w + 0.01 * np.array(d)
        assert w @ cm @ w <= v @ cm @ v


def test_kdcl_general_weights_identical_students_no_nan():
    g = torch.Generator().manual_seed(4)
    p = F.softmax(torch.randn(10, 5, generator=g, dtype=torch.float64), 1)
    y = torch.randint(0, 5, (10,), generator=g)
    w = L.kdcl_general_weights([p, p.clone(), p.clone()], y)
    assert torch.isfinite(w).all()
    np.testing.assert_allclose(w.numpy(), [1 / 3] * 3, rtol=1e-6)
    perfect = F.one_hot(y, 5).double()
    w = L.kdcl_general_weights([perfect, perfect], y)
    np.testing.assert_allclose(w.numpy(), [0.5, 0.5])


# ----------------------------------------------------------------------------- KDCL loss

def test_kdcl_loss_matches_formula():
    z, zt, y = leaf(5, 6, seed=80), leaf(5, 6, seed=81), labels(5, 6, seed=10)
    got = L.kdcl_loss(z, zt, y, 3.0, 0.5)
    assert got.item() == pytest.approx(ref_ce(z, y) + 0.5 * ref_soft_kl(z, zt, 3.0), rel=1e-10)
    got.backward()
    assert_no_grad(zt)
    assert_has_grad(z)


# ----------------------------------------------------------------------------- ONE

def _one_setup(seed=90, b=5, c=4, m=3):
    branches = [leaf(b, c, seed=seed + i) for i in range(m)]
    gate_raw = leaf(b, m, seed=seed + 10)
    return branches, gate_raw, labels(b, c, seed=seed)


def test_one_ensemble_logits_against_loop():
    branches, gate_raw, _ = _one_setup()
    gate = F.softmax(gate_raw, 1)
    z_e = L.one_ensemble_logits(branches, gate)
    assert z_e.requires_grad
    g, zs = gate.tolist(), [z.tolist() for z in branches]
    want = [[sum(g[b][i] * zs[i][b][c] for i in range(3)) for c in range(4)] for b in range(5)]
    np.testing.assert_allclose(z_e.detach().numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError):
        L.one_ensemble_logits(branches, gate[:, :2])


def test_one_loss_matches_formula():
    branches, gate_raw, y = _one_setup()
    gate = F.softmax(gate_raw, 1)
    t, lam = 3.0, 0.8
    got = L.one_loss(branches, gate, y, t, lam)
    g, zs = gate.tolist(), [z.tolist() for z in branches]
    z_e = torch.tensor([[sum(g[b][i] * zs[i][b][c] for i in range(3)) for c in range(4)]
                        for b in range(5)], dtype=torch.float64)
    want = (sum(ref_ce(z, y) for z in branches) + ref_ce(z_e, y)
            + lam * sum(ref_soft_kl(z, z_e, t) for z in branches))
    assert got.item() == pytest.approx(want, rel=1e-10)
    # Defaults: T = 3, λ = 1.
    want_default = (sum(ref_ce(z, y) for z in branches) + ref_ce(z_e, y)
                    + sum(ref_soft_kl(z, z_e, 3.0) for z in branches))
    assert L.one_loss(branches, gate, y).item() == pytest.approx(want_default, rel=1e-10)


def _grads(fn, branches, gate_raw):
    bs = [z.detach().clone().requires_grad_(True) for z in branches]
    gr = gate_raw.detach().clone().requires_grad_(True)
    fn(bs, F.softmax(gr, 1)).backward()
    return [z.grad for z in bs], gr.grad


def test_one_loss_gradients_gate_only_through_ensemble_ce():
    branches, gate_raw, y = _one_setup(seed=100)
    t, lam = 3.0, 2.0
    full_b, full_g = _grads(lambda bs, g: L.one_loss(bs, g, y, t, lam), branches, gate_raw)
    ce_b, ce_g = _grads(lambda bs, g: F.cross_entropy(
        sum(g[:, i:i + 1] * z for i, z in enumerate(bs)), y), branches, gate_raw)
    # The gate is reached (through CE(z_e, y)) and only through it.
    assert torch.count_nonzero(full_g) > 0
    torch.testing.assert_close(full_g, ce_g, rtol=1e-10, atol=1e-14)
    _, g_no_kd = _grads(lambda bs, g: L.one_loss(bs, g, y, t, 0.0), branches, gate_raw)
    torch.testing.assert_close(full_g, g_no_kd, rtol=1e-10, atol=1e-14)

    # Reference with the ensemble detached inside the KL terms only.
    def ref(bs, g):
        z_e = sum(g[:, i:i + 1] * z for i, z in enumerate(bs))
        te = z_e.detach()
        kl = sum(t * t * F.kl_div(F.log_softmax(z / t, 1), F.softmax(te / t, 1),
                                  reduction="batchmean") for z in bs)
        return sum(F.cross_entropy(z, y) for z in bs) + F.cross_entropy(z_e, y) + lam * kl

    ref_b, ref_g = _grads(ref, branches, gate_raw)
    for a, r in zip(full_b, ref_b):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(full_g, ref_g, rtol=1e-10, atol=1e-14)

    # Sanity: had the KL gone through z_e, the gate gradient would differ (test can fail).
    def leaky(bs, g):
        z_e = sum(g[:, i:i + 1] * z for i, z in enumerate(bs))
        kl = sum(t * t * F.kl_div(F.log_softmax(z / t, 1), F.softmax(z_e / t, 1),
                                  reduction="batchmean") for z in bs)
        return sum(F.cross_entropy(z, y) for z in bs) + F.cross_entropy(z_e, y) + lam * kl

    _, leaky_g = _grads(leaky, branches, gate_raw)
    assert not torch.allclose(full_g, leaky_g, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- mutation-check additions
# (`make mutate`): error messages name the argument, no warnings, devices, dtypes, edge cases.

def _bisect_simplex_projection(v):
    """Reference: x = max(v − θ, 0) with Σx = 1, θ found by bisection (float64)."""
    lo, hi = min(v) - 1.0, max(v)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(max(a - mid, 0.0) for a in v) > 1.0:
            lo = mid
        else:
            hi = mid
    return [max(a - 0.5 * (lo + hi), 0.0) for a in v]


@pytest.mark.parametrize("v", [[0.5, 0.2, 0.9], [0.2, 0.3, 0.5], [3.0, -1.0, 0.0, 2.5],
                               [-2.0, -1.0, -3.0], [0.25], [1.0, 1.0, 1.0, 1.0]])
def test_project_simplex_against_bisection(v):
    # (checks the projection of the old-solver reference above)
    got = _ref_project_simplex(np.array(v, dtype=np.float64))
    np.testing.assert_allclose(got, _bisect_simplex_projection(v), atol=1e-12)
    assert got.min() >= 0.0 and got.sum() == pytest.approx(1.0, abs=1e-12)


def test_losses_emit_no_warnings():
    zs = [leaf(6, 4, seed=300 + k) for k in range(3)]
    y = labels(6, 4, seed=30)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        L.soft_kl(zs[0], zs[1], 2.0)
        L.kd_loss(zs[0], zs[1], y, 4.0, 0.9)
        L.dml_loss(zs[0], zs[1:], y, 1.0, 1.0)
        for variant in ("naive", "minlogit", "linear"):
            L.kdcl_teacher(zs, y, variant)
        L.kdcl_general_weights([torch.softmax(z.detach(), 1) for z in zs], y)
        L.one_loss(zs, torch.softmax(leaf(6, 3, seed=31), 1), y)


@pytest.mark.parametrize("call,message", [
    (lambda: L.soft_kl(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), 1.0),
     "student_logits must be a 2-D tensor of logits (B x C), got (2, 3, 1)"),
    (lambda: L.soft_kl(torch.zeros(2, 3), torch.zeros(3), 1.0),
     "target_logits must be a 2-D tensor of logits (B x C), got (3,)"),
    (lambda: L.soft_kl([[0.0, 1.0]], torch.zeros(1, 2), 1.0),
     "student_logits must be a 2-D tensor of logits (B x C), got list"),
    (lambda: L.soft_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0),
     "student_logits (2, 3) and target_logits (2, 4) differ in shape"),
    (lambda: L.soft_kl(torch.zeros(2, 3), torch.zeros(2, 3), "warm"),
     "temperature must be a number > 0, got 'warm'"),
    (lambda: L.soft_kl(torch.zeros(2, 3), torch.zeros(2, 3), float("inf")),
     "temperature must be a finite number > 0, got inf"),
    (lambda: L.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0, 1.5),
     "alpha must lie in [0, 1], got 1.5"),
    (lambda: L.dml_loss(torch.zeros(2, 3), [], torch.zeros(2, dtype=torch.long)),
     "dml_loss needs at least one peer (K >= 2)"),
    (lambda: L.kdcl_teacher([], torch.zeros(2, dtype=torch.long), "naive"),
     "logits must hold at least one tensor"),
    (lambda: L.kdcl_teacher([torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4)],
                            torch.zeros(2, dtype=torch.long), "naive"),
     "logits[0] (2, 3) and logits[2] (2, 4) differ in shape"),
    (lambda: L.kdcl_teacher([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long), "mean"),
     "unknown KDCL variant 'mean'; allowed: naive, linear, minlogit, general"),
    (lambda: L.kdcl_teacher([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long), "general"),
     "KDCL variant 'general' needs weights (see kdcl_general_weights)"),
    (lambda: L.kdcl_teacher([torch.zeros(2, 3)] * 2, torch.zeros(2, dtype=torch.long), "general", [1.0]),
     "general KDCL weights: expected 2 values, got 1"),
    (lambda: L.kdcl_teacher([torch.zeros(2, 3)] * 2, torch.zeros(2, dtype=torch.long), "general",
                            [0.5, float("nan")]),
     "general KDCL weights must be finite, got [0.5, nan]"),
    (lambda: L.kdcl_linear_weights([torch.zeros(2, 3), torch.zeros(3, 3)], torch.zeros(2, dtype=torch.long)),
     "logits[0] (2, 3) and logits[1] (3, 3) differ in shape"),
    (lambda: L.kdcl_general_weights([torch.zeros(2, 3), torch.zeros(2, 2)], torch.zeros(2, dtype=torch.long)),
     "probs[0] (2, 3) and probs[1] (2, 2) differ in shape"),
    (lambda: L.kdcl_general_weights([torch.full((2, 3), float("nan"))] * 2, torch.zeros(2, dtype=torch.long)),
     "kdcl_general_weights: non-finite probabilities"),
    (lambda: L.one_ensemble_logits([torch.zeros(2, 3), torch.zeros(2, 5)], torch.zeros(2, 2)),
     "branch_logits[0] (2, 3) and branch_logits[1] (2, 5) differ in shape"),
    (lambda: L.one_ensemble_logits([torch.zeros(2, 3)] * 2, torch.zeros(2, 2, 1)),
     "gate must be B x m = 2 x 2, got (2, 2, 1)"),
    (lambda: L.one_ensemble_logits([torch.zeros(2, 3)] * 2, torch.zeros(3, 2)),
     "gate must be B x m = 2 x 2, got (3, 2)"),
])
def test_error_messages_name_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_single_member_cases():
    z = leaf(5, 4, seed=400).detach()
    y = labels(5, 4, seed=40)
    w = L.kdcl_linear_weights([z], y)
    assert w.dtype == torch.float64 and w.shape == (1,) and w.tolist() == [1.0]
    torch.testing.assert_close(L.kdcl_teacher([z], y, "naive"), z)
    gate = torch.ones(5, 1)
    torch.testing.assert_close(L.one_ensemble_logits([z], gate), z)


def test_kdcl_teachers_stay_on_the_logits_device():
    """Built on the students' device (the meta device stands in for a GPU here). The meta
    device holds no values, so any host read-back (``.item()``, ``bool(t)``, indexing by a
    0-d tensor) raises there: the linear solve passing proves it never syncs off the CPU."""
    zs = [torch.randn(4, 3, device="meta") for _ in range(3)]
    y = torch.zeros(4, dtype=torch.long, device="meta")
    for variant, weights in (("naive", None), ("minlogit", None), ("general", [0.2, 0.3, 0.5]),
                             ("linear", None)):
        out = L.kdcl_teacher(zs, y, variant, weights)
        assert out.device.type == "meta" and out.shape == (4, 3) and out.dtype == torch.float32
    for k in (1, 3, 8):
        w = L.kdcl_linear_weights([torch.randn(4, 3, device="meta")] * k, y)
        assert w.device.type == "meta" and w.dtype == torch.float64 and w.shape == (k,)


def test_kdcl_weights_accept_int32_labels_and_unused_classes():
    zs = [leaf(6, 5, seed=500 + k).detach() for k in range(3)]
    y = torch.tensor([0, 1, 2, 1, 0, 2])                 # classes 3 and 4 never occur
    ref = L.kdcl_linear_weights(zs, y)
    torch.testing.assert_close(L.kdcl_linear_weights(zs, y.to(torch.int32)), ref, rtol=0, atol=0)
    probs = [torch.softmax(z, 1) for z in zs]
    gen = L.kdcl_general_weights(probs, y)
    torch.testing.assert_close(L.kdcl_general_weights(probs, y.to(torch.int32)), gen, rtol=0, atol=0)
    # Against the closed form over all 5 classes, with the documented ridge 1e-8·trace(C)/K.
    onehot = np.eye(5)[y.numpy()]
    r = np.stack([(p.numpy() - onehot).reshape(-1) for p in probs])
    cmat = r @ r.T / 6
    cmat = cmat + 1e-8 * np.trace(cmat) / 3 * np.eye(3)
    u = np.linalg.solve(cmat, np.ones(3))
    np.testing.assert_allclose(gen.numpy(), u / u.sum(), rtol=1e-12, atol=1e-14)


def test_kdcl_general_weights_ridge_is_relative_to_the_trace():
    """Two nearly identical students: the weights depend on the ridge, so it must be
    exactly 1e-8·trace(C)/K (float64 reference)."""
    g = torch.Generator().manual_seed(77)
    base = torch.softmax(torch.randn(40, 6, generator=g, dtype=torch.float64), 1)
    probs = [base, torch.softmax(base.log() + 1e-3 * torch.randn(40, 6, generator=g,
                                                                   dtype=torch.float64), 1),
             torch.softmax(torch.randn(40, 6, generator=g, dtype=torch.float64), 1)]
    y = torch.randint(0, 6, (40,), generator=g)
    onehot = np.eye(6)[y.numpy()]
    r = np.stack([(p.numpy() - onehot).reshape(-1) for p in probs])
    cmat = r @ r.T / 40
    cmat = cmat + 1e-8 * np.trace(cmat) / 3 * np.eye(3)
    u = np.linalg.solve(cmat, np.ones(3))
    got = L.kdcl_general_weights(probs, y).numpy()
    np.testing.assert_allclose(got, u / u.sum(), rtol=1e-7)
    off = np.linalg.solve(cmat + 8e-8 * np.trace(cmat) / 3 * np.eye(3), np.ones(3))
    assert np.abs(off / off.sum() - got).max() > 1e-5     # the ridge matters here


def test_kdcl_general_weights_all_perfect_is_uniform_float64():
    y = torch.tensor([0, 2, 1])
    perfect = F.one_hot(y, 3).to(torch.float32)
    w = L.kdcl_general_weights([perfect, perfect.clone(), perfect.clone(), perfect.clone()], y)
    assert w.dtype == torch.float64 and w.tolist() == [0.25] * 4


def _qp_by_enumeration(H, c):
    """Reference: min ½x'Hx + c'x on the simplex, by solving the equality-constrained
    problem on every support set and keeping the best feasible point (float64)."""
    k = c.size
    best, best_x = math.inf, None
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            kkt = np.zeros((r + 1, r + 1))
            kkt[:r, :r] = H[np.ix_(s, s)]
            kkt[:r, r] = kkt[r, :r] = 1.0
            sol = np.linalg.solve(kkt, np.concatenate([-c[s], [1.0]]))
            if sol[:r].min() < -1e-12:
                continue
            x = np.zeros(k)
            x[s] = np.maximum(sol[:r], 0.0)
            value = 0.5 * x @ H @ x + c @ x
            if value < best:
                best, best_x = value, x
    return best_x


@pytest.mark.parametrize("seed", range(12))
def test_simplex_qp_against_enumeration(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed % 4
    a = rng.normal(size=(k, k))
    H = a @ a.T + 0.1 * np.eye(k)
    c = rng.normal(size=k) * (1 + seed % 3) * 2.0
    want = _qp_by_enumeration(H, c)
    Ht, ct = torch.from_numpy(H), torch.from_numpy(c)
    got = L._simplex_qp_supports(Ht, ct)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    assert got.min().item() >= 0.0 and got.sum().item() == pytest.approx(1.0, abs=1e-12)
    for x0 in [np.full(k, 1.0 / k)] + [np.eye(k)[j] for j in range(k)]:
        got = L._simplex_qp_active_set(Ht, ct, torch.from_numpy(x0))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
        assert got.min().item() >= 0.0 and got.sum().item() == pytest.approx(1.0, abs=1e-12)
        got = _ref_simplex_qp(H, c, x0)        # the old solver's QP, kept as a reference
        np.testing.assert_allclose(got, want, atol=1e-10)


# ----------------------------------------------------------------------------- KDCL linear vs the old solver

def _linear_case(seed):
    """A random KDCL-linear problem: K = 2..5, B up to 128, C = 10 or 100; every fifth case
    has one good student among bad ones (optimum at a vertex), every fifth one a student
    anti-correlated with the labels (optimum on a face), every fifth two near-copies."""
    g = torch.Generator().manual_seed(5000 + seed)
    k = 2 + seed % 4
    c = (10, 100)[seed // 4 % 2]
    b = (8, 37, 64, 128)[seed // 2 % 4]
    y = torch.randint(0, c, (b,), generator=g)
    onehot = F.one_hot(y, c).double()

    def draw(scale, bias):
        return scale * torch.randn(b, c, generator=g, dtype=torch.float64) + bias * onehot

    zs = [draw(0.3 + 3 * torch.rand((), generator=g).item(), 4 * torch.rand((), generator=g).item())
          for _ in range(k)]
    kind = seed % 5
    if kind == 0:
        zs = [zs[0]] + [draw(2.0, -3.0) for _ in range(k - 1)]
    elif kind == 1:
        zs[-1] = draw(1.0, -5.0)
    elif kind == 2:
        zs[-1] = zs[0] + 1e-3 * torch.randn(b, c, generator=g, dtype=torch.float64)
    if seed % 7 == 3:
        zs = [z.float() for z in zs]
    return zs, y


def test_kdcl_linear_matches_the_old_numpy_solver():
    worst, on_boundary = 0.0, 0
    for seed in range(50):
        zs, y = _linear_case(seed)
        want = _ref_kdcl_linear_weights(zs, y)
        got = L.kdcl_linear_weights(zs, y)
        assert got.dtype == torch.float64 and got.device == zs[0].device and got.shape == want.shape
        delta = (got - want).abs().max().item()
        assert delta <= 1e-6, (seed, got.tolist(), want.tolist())
        worst = max(worst, delta)
        assert got.min().item() >= 0.0 and got.sum().item() == pytest.approx(1.0, abs=1e-12)
        on_boundary += int((got == 0).any().item())
        # Monotone: no worse than the uniform average or any single student.
        z64 = [z.double() for z in zs]
        ce = _ce64(sum(w * z for w, z in zip(got.tolist(), z64)), y)
        assert ce <= min(_ce64(sum(z64) / len(z64), y), *(_ce64(z, y) for z in z64)) + 1e-12
    assert on_boundary >= 10      # vertices and faces were covered
    assert worst < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 6, 13, 22, 39])
def test_kdcl_linear_without_host_syncs_matches_and_repeats(seed):
    """The sync-free form (what runs off the CPU: fixed Newton steps, masked updates, all step
    sizes at once) gives the CPU form's weights, and the same bits every call."""
    zs, y = _linear_case(seed)
    members = L._stack_members("logits", zs)
    early = L._linear_weights(members, y, early_exit=True)
    fixed = L._linear_weights(members, y, early_exit=False)
    torch.testing.assert_close(fixed, early, rtol=0, atol=1e-12)
    assert torch.equal(L._linear_weights(members, y, early_exit=False), fixed)
    torch.testing.assert_close(early, L.kdcl_linear_weights(zs, y), rtol=0, atol=0)


class _LaggedPoll:
    """Stands in for the CUDA poll: sees the stop flag `lag` iterations late."""

    def __init__(self, lag):
        self.lag, self.flags = lag, []

    def stop(self, done):
        self.flags.append(bool(done))
        seen = len(self.flags) - 1 - self.lag
        return seen >= 0 and self.flags[seen]


@pytest.mark.parametrize("seed", [0, 13, 22])
def test_kdcl_linear_leaving_the_sync_free_loop_early_changes_nothing(seed):
    zs, y = _linear_case(seed)
    fixed = L._linear_weights(zs, y, early_exit=False)
    for lag in (0, 2):
        poll = _LaggedPoll(lag)
        assert torch.equal(L._linear_weights(zs, y, early_exit=False, poll=poll), fixed)
        assert len(poll.flags) < L._LINEAR_MAX_NEWTON      # it did leave early
        assert len(poll.flags) == poll.flags.index(True) + 1 + lag


@pytest.mark.parametrize("k", [8, L._QP_ENUMERATE_MAX_K + 1])
def test_kdcl_linear_many_students(k):
    """K = 8 (255 supports enumerated) and, past the enumeration limit, the active-set QP."""
    g = torch.Generator().manual_seed(12)
    b, c = 64, 10
    y = torch.randint(0, c, (b,), generator=g)
    onehot = F.one_hot(y, c).double()
    # Every third student is wrong on average (weight 0), the others mix.
    zs = [1.5 * torch.randn(b, c, generator=g, dtype=torch.float64)
          + (2.0 if i % 3 else -1.0) * onehot for i in range(k)]
    want = _ref_kdcl_linear_weights(zs, y)
    got = L.kdcl_linear_weights(zs, y)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    assert (got == 0).any() and (got > 0).sum() > 1
    if k <= L._QP_ENUMERATE_MAX_K:
        fixed = L._linear_weights(zs, y, early_exit=False)
        torch.testing.assert_close(fixed, got, rtol=0, atol=1e-12)

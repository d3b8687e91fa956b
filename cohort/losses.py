"""Distillation losses, as defined in ``METHODS.md`` (pure functions, no Ray).

Notation: ``z_k`` logits (B×C), ``y`` labels (B,), ``p^T = softmax(z / T)``, ``CE`` the mean
cross-entropy over the batch. Every *target* of a KL term (teacher, peer, ensemble) is
detached inside the function that uses it: no gradient ever reaches a target through a KL
term. All losses return a scalar tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "soft_kl",
    "kd_loss",
    "dml_loss",
    "kdcl_teacher",
    "kdcl_linear_weights",
    "kdcl_general_weights",
    "kdcl_loss",
    "one_ensemble_logits",
    "one_loss",
    "KDCL_VARIANTS",
]

KDCL_VARIANTS = ("naive", "linear", "minlogit", "general")

# Linear KDCL teacher solver (projected Newton on the simplex), fixed for determinism.
_LINEAR_MAX_NEWTON = 30      # outer Newton iterations
_LINEAR_TOL = 1e-16          # stop when the Newton decrement -g'd falls below this (nats)
_LINEAR_MAX_HALVINGS = 30    # Armijo backtracking steps
_QP_MAX_ITER = 64            # active-set iterations of the K-dim quadratic sub-problem


# ----------------------------------------------------------------------------- checks

def _check_temperature(temperature) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_logits(name: str, z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a 2-D tensor of logits (B x C), got {shape}")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    _check_logits(name_a, a)
    _check_logits(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} differ in shape")


def _stack_members(name: str, logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    members = list(logits)
    if not members:
        raise ValueError(f"{name} must hold at least one tensor")
    for i, z in enumerate(members):
        _check_same_shape(f"{name}[0]", members[0], f"{name}[{i}]", z)
    return members


# ----------------------------------------------------------------------------- KD / DML

def soft_kl(student_logits: torch.Tensor, target_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T² · (1/B) Σ_b Σ_c p_t[b,c] (log p_t[b,c] − log p_s[b,c])``, ``p = softmax(z/T)``.

    The target is detached: gradient flows only into ``student_logits``.
    """
    t = _check_temperature(temperature)
    _check_same_shape("student_logits", student_logits, "target_logits", target_logits)
    log_ps = F.log_softmax(student_logits / t, dim=1)
    log_pt = F.log_softmax(target_logits.detach() / t, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (t * t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton KD: ``(1 − α) · CE(z_s, y) + α · soft_kl(z_s, z_teacher, T)`` (teacher detached)."""
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    kl = soft_kl(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits, labels)
    return (1.0 - alpha) * ce + alpha * kl


def dml_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], labels: torch.Tensor,
             temperature: float = 1.0, kd_weight: float = 1.0) -> torch.Tensor:
    """Deep Mutual Learning, member k: ``CE(z_k, y) + λ · (1/(K−1)) Σ_{l≠k} soft_kl(z_k, z_l, T)``.

    ``peer_logits`` holds the K−1 other members' logits (each detached here).
    """
    peers = list(peer_logits)
    if not peers:
        raise ValueError("dml_loss needs at least one peer (K >= 2)")
    kl = sum(soft_kl(logits, p, temperature) for p in peers) / len(peers)
    return F.cross_entropy(logits, labels) + kd_weight * kl


# ----------------------------------------------------------------------------- KDCL

def _per_sample_ce(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z, labels, reduction="none")


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {a ≥ 0, Σ a = 1} (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _simplex_qp(H: np.ndarray, c: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Exact primal active-set solve of ``min ½ x'Hx + c'x`` s.t. ``x ≥ 0, Σ x = 1``.

    ``H`` must be symmetric positive definite (the caller adds a ridge); ``x0`` feasible.
    (Nocedal & Wright, Numerical Optimization, Alg. 16.3.)
    """
    k = c.size
    x = x0.copy()
    active = x <= 0.0
    x[active] = 0.0
    for _ in range(_QP_MAX_ITER):
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
            return _project_simplex(x0)
    return x / x.sum()


def kdcl_linear_weights(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """KDCL-linear weights ``a = argmin_{a ∈ simplex} CE(Σ_k a_k z_k, y)`` (float64, CPU, K,).

    Convex in ``a``; solved by a deterministic projected Newton method in float64: start at
    the best of the uniform average and the K single students, then at most
    ``_LINEAR_MAX_NEWTON`` steps, each minimising the exact quadratic model (Hessian plus a
    1e-10 relative ridge) over the simplex with an active-set solver, followed by Armijo
    backtracking; stops once the Newton decrement is below ``_LINEAR_TOL``. Every step is
    monotone, so ``CE(result) ≤ min(CE(uniform), CE(z_k) for all k)``. Same inputs →
    bit-identical weights.
    """
    members = _stack_members("logits", logits)
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

        for _ in range(_LINEAR_MAX_NEWTON):
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
            x = _simplex_qp(h_np, g_np - h_np @ a_np, a_np)
            d = x - a_np
            slope = float(g_np @ d)
            if not slope < -_LINEAR_TOL:
                break
            t, accepted = 1.0, False
            for _ in range(_LINEAR_MAX_HALVINGS):
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


def kdcl_teacher(logits: Sequence[torch.Tensor], labels: torch.Tensor, variant: str,
                 weights=None) -> torch.Tensor:
    """The KDCL teacher logits ``z_t`` (B×C, detached) built from K students' logits.

    - ``naive``: per sample, the logits of the student with the lowest CE on it (ties: first).
    - ``minlogit``: ``z'_k = z_k − z_k[y]``; ``z_t[b,c] = min_k z'_k[b,c]`` (0 at the true class).
    - ``linear``: ``z_t = Σ a_k z_k``, ``a = argmin_{simplex} CE(Σ a_k z_k, y)``
      (see :func:`kdcl_linear_weights`).
    - ``general``: ``z_t = Σ w_k z_k`` with the given ``weights`` (K floats, from
      :func:`kdcl_general_weights`).
    """
    if variant not in KDCL_VARIANTS:
        raise ValueError(f"unknown KDCL variant {variant!r}; allowed: {', '.join(KDCL_VARIANTS)}")
    members = [z.detach() for z in _stack_members("logits", logits)]
    labels = labels.detach()
    with torch.no_grad():
        stacked = torch.stack(members)  # K×B×C
        k = stacked.shape[0]
        if variant == "naive":
            ce = torch.stack([_per_sample_ce(z, labels) for z in members])  # K×B
            idx = torch.argmin(ce, dim=0)                                    # B
            b = stacked.shape[1]
            return stacked[idx, torch.arange(b, device=stacked.device)].clone()
        if variant == "minlogit":
            true = stacked.gather(2, labels.view(1, -1, 1).expand(k, -1, 1))
            return (stacked - true).min(dim=0).values
        if variant == "linear":
            w = kdcl_linear_weights(members, labels)
        else:  # general
            if weights is None:
                raise ValueError("KDCL variant 'general' needs weights (see kdcl_general_weights)")
            w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
            if w.numel() != k:
                raise ValueError(f"general KDCL weights: expected {k} values, got {w.numel()}")
            if not torch.isfinite(w).all():
                raise ValueError(f"general KDCL weights must be finite, got {w.tolist()}")
        w = w.to(device=stacked.device, dtype=stacked.dtype)
        return (w.view(k, 1, 1) * stacked).sum(0)


def kdcl_general_weights(probs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """KDCL-general weights ``w = C⁻¹1 / (1'C⁻¹1)`` (float64 tensor of K, sums to 1).

    ``C_ij = mean_n Σ_c (p_i − onehot(y))·(p_j − onehot(y))`` over a held-out split, ``probs``
    being K softmax outputs (N×C). Computed in float64. ``C`` is singular when two students
    agree exactly, so a ridge ``1e-8 · trace(C)/K`` is added to the diagonal before solving
    (identical students then get equal weights); if ``C = 0`` (all perfect) the weights are
    uniform. The weights minimise ``w'Cw`` under ``Σw = 1`` only and may be negative.
    """
    members = _stack_members("probs", probs)
    k = len(members)
    with torch.no_grad():
        p = torch.stack([m.detach() for m in members]).to("cpu", torch.float64)  # K×N×C
        y = labels.detach().to("cpu", torch.long)
        n, c = p.shape[1], p.shape[2]
        onehot = F.one_hot(y, c).to(torch.float64)
        r = (p - onehot).reshape(k, n * c)
        cmat = (r @ r.T) / n
        cmat = 0.5 * (cmat + cmat.T)
        scale = float(torch.trace(cmat)) / k
        if not math.isfinite(scale):
            raise ValueError("kdcl_general_weights: non-finite probabilities")
        if scale <= 0.0:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        cmat = cmat + (1e-8 * scale) * torch.eye(k, dtype=torch.float64)
        ones = torch.ones(k, 1, dtype=torch.float64)
        u = torch.linalg.solve(cmat, ones).reshape(-1)
        return u / u.sum()


def kdcl_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float, kd_weight: float) -> torch.Tensor:
    """KDCL, student k: ``CE(z_k, y) + λ · soft_kl(z_k, z_t, T)`` (teacher detached)."""
    return F.cross_entropy(logits, labels) + kd_weight * soft_kl(logits, teacher_logits, temperature)


# ----------------------------------------------------------------------------- ONE

def one_ensemble_logits(branch_logits: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """ONE's gated ensemble ``z_e = Σ_i g[:, i] · z_i`` (B×C, with graph into gate and branches)."""
    branches = _stack_members("branch_logits", branch_logits)
    m = len(branches)
    bsz = branches[0].shape[0]
    if gate.dim() != 2 or gate.shape[0] != bsz or gate.shape[1] != m:
        raise ValueError(f"gate must be B x m = {bsz} x {m}, got {tuple(gate.shape)}")
    z_e = gate[:, 0:1] * branches[0]
    for i in range(1, m):
        z_e = z_e + gate[:, i:i + 1] * branches[i]
    return z_e


def one_loss(branch_logits: Sequence[torch.Tensor], gate: torch.Tensor, labels: torch.Tensor,
             temperature: float = 3.0, kd_weight: float = 1.0) -> torch.Tensor:
    """ONE: ``Σ_i CE(z_i, y) + CE(z_e, y) + λ · Σ_i soft_kl(z_i, z_e, T)``, ``z_e = Σ_i g_i z_i``.

    Gradient reaches the gate and branches through ``CE(z_e, y)``; inside the KL terms
    ``z_e`` is detached (the ensemble teacher gets no KL gradient).
    """
    _check_temperature(temperature)
    branches = list(branch_logits)
    z_e = one_ensemble_logits(branches, gate)
    teacher = z_e.detach()
    loss = F.cross_entropy(z_e, labels)
    for z in branches:
        loss = loss + F.cross_entropy(z, labels)
    kl = sum(soft_kl(z, teacher, temperature) for z in branches)
    return loss + kd_weight * kl

"""Distillation losses, as defined in ``METHODS.md`` (pure functions, no Ray).

Notation: ``z_k`` logits (B×C), ``y`` labels (B,), ``p^T = softmax(z / T)``, ``CE`` the mean
cross-entropy over the batch. Every *target* of a KL term (teacher, peer, ensemble) is
detached inside the function that uses it: no gradient ever reaches a target through a KL
term. All losses return a scalar tensor.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

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

# Linear KDCL teacher solver (projected Newton on the simplex, torch on the logits' device),
# fixed for determinism.
_LINEAR_MAX_NEWTON = 30      # Newton iterations (off the CPU always all of them, masked)
_LINEAR_TOL = 1e-16          # stop when the Newton decrement -g'd falls below this (nats)
_LINEAR_MAX_HALVINGS = 30    # Armijo backtracking: step sizes 1, 1/2, ..., 2^-29
_QP_ENUMERATE_MAX_K = 12     # up to this K the quadratic sub-problem enumerates its 2^K - 1 supports
_QP_FEASIBLE_TOL = 1e-12     # a support's solution is feasible if no weight is below -this
_QP_MAX_ITER = 64            # active-set iterations of the sub-problem above that K (host-driven)


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


@functools.lru_cache(maxsize=64)
def _support_systems(k: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """The fixed parts of the KKT systems of :func:`_simplex_qp_supports`, one per support
    S ⊆ {0..K−1} (S ≠ ∅, bit i of ``n + 1`` ⇔ i ∈ S): ``masks`` (N×K, bool), and ``base``,
    ``scale`` (N×(K+1)×(K+1)), ``rhs_base``, ``rhs_scale`` (N×(K+1)) such that the system of
    support S for ``H``, ``c`` is ``base + scale·[H 0; 0 0]``, ``rhs_base − rhs_scale·[c; 0]``:
    ``[H_SS 1; 1' 0] [x_S; ν] = [−c_S; 1]`` with identity rows pinning ``x_i = 0``, i ∉ S.
    Cached per (K, dtype, device); read-only."""
    bits = torch.arange(k, device=device)
    masks = ((torch.arange(1, 1 << k, device=device).unsqueeze(1) >> bits) & 1).bool()  # N×K
    n = masks.shape[0]
    inside = torch.cat([masks.to(dtype), torch.zeros(n, 1, dtype=dtype, device=device)], 1)
    scale = inside.unsqueeze(2) * inside.unsqueeze(1)
    base = torch.zeros(n, k + 1, k + 1, dtype=dtype, device=device)
    base[:, :k, :k] = torch.diag_embed(1.0 - inside[:, :k])
    base[:, :k, k] = inside[:, :k]
    base[:, k, :k] = inside[:, :k]
    rhs_base = torch.zeros(n, k + 1, dtype=dtype, device=device)
    rhs_base[:, k] = 1.0
    return masks, base, scale, rhs_base, inside


def _simplex_qp_supports(H: torch.Tensor, c: torch.Tensor, systems: tuple | None = None) -> torch.Tensor:
    """Exact ``argmin ½ x'Hx + c'x`` s.t. ``x ≥ 0, Σ x = 1`` by enumerating supports (torch).

    ``H`` (K×K) symmetric positive definite (the caller adds a ridge), ``c`` (K,), any device;
    ``systems`` from :func:`_support_systems` (built here if not given). For each of the
    ``2^K − 1`` supports S the equality-constrained problem on S (its KKT system) is solved in
    one batched ``linalg.solve_ex``; of the solutions with no weight below
    ``−_QP_FEASIBLE_TOL`` the one with the lowest objective is the optimum (the optimum's own
    support is among them). The objective of a KKT solution is ``½ (c'x − ν)`` since
    ``x'H x = −c'x − ν``. Ties go to the lowest support bitmask. No host synchronisation.
    """
    k = c.numel()
    if systems is None:
        systems = _support_systems(k, c.dtype, c.device)
    masks, base, scale, rhs_base, rhs_scale = systems
    kkt = torch.addcmul(base, scale, F.pad(H, (0, 1, 0, 1)))
    rhs = torch.addcmul(rhs_base, rhs_scale, F.pad(c, (0, 1)), value=-1.0)
    sol, info = torch.linalg.solve_ex(kkt, rhs.unsqueeze(2))
    x = torch.where(masks, sol[:, :k, 0], 0.0)                                        # N×K
    obj = torch.addmv(sol[:, k, 0], x, c, beta=-1.0)             # 2·objective = c'x − ν
    ok = (x.amin(1) >= -_QP_FEASIBLE_TOL) & (info == 0) & torch.isfinite(obj)
    best = x.index_select(0, torch.argmin(torch.where(ok, obj, math.inf)).view(1))[0].clamp_min(0.0)
    return best / best.sum()


def _simplex_qp_active_set(H: torch.Tensor, c: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The same problem by a primal active-set method (Nocedal & Wright, Numerical
    Optimization, Alg. 16.3), for K too large to enumerate supports; ``x0`` feasible. Its
    control flow reads flags on the host (a device sync per iteration off the CPU)."""
    k = c.numel()
    dev, dt = c.device, c.dtype
    eye = torch.eye(k, dtype=dt, device=dev)
    active = x0 <= 0.0
    x = x0.clamp_min(0.0)
    for _ in range(_QP_MAX_ITER):
        free = ~active
        ff = free.to(dt)
        grad = H @ x + c
        kkt = torch.zeros(k + 1, k + 1, dtype=dt, device=dev)
        kkt[:k, :k] = (ff.unsqueeze(1) * ff.unsqueeze(0)) * H + (1.0 - ff).unsqueeze(1) * eye
        kkt[:k, k] = ff
        kkt[k, :k] = ff
        rhs = torch.cat([-grad * ff, torch.zeros(1, dtype=dt, device=dev)]).unsqueeze(1)
        sol = torch.linalg.solve_ex(kkt, rhs)[0][:, 0]
        p = torch.where(free, sol[:k], 0.0)
        if bool(p.abs().max() <= 1e-14 * x.abs().max().clamp_min(1.0)):
            # Stationary on this face: bound multipliers λ_i = grad_i + ν must be ≥ 0.
            lam, j = torch.where(active, grad + sol[k], math.inf).min(0)
            if not bool(active.any()) or bool(lam >= -1e-14 * grad.abs().max().clamp_min(1.0)):
                break
            active[j] = False
            continue
        ratio, blocking = torch.where(free & (p < 0.0), -x / p, math.inf).min(0)
        if bool(ratio < 1.0):
            x = x + ratio * p
            x[blocking] = 0.0
            active[blocking] = True
        else:
            x = x + p
        x = x.clamp_min(0.0)
    return x / x.sum()


def _linear_ce(a: torch.Tensor, zf: torch.Tensor, y_rep: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """``CE(Σ_k a_k z_k, y)`` for each row of ``a`` (J×K) → (J,); ``y_rep`` is ``y`` repeated J
    times."""
    s = (a @ zf).view(-1, c)
    return F.cross_entropy(s, y_rep, reduction="none").view(-1, b).mean(1)


class _DonePoll:
    """Ends a sync-free CUDA loop early without ever waiting on the device: each
    :meth:`stop` queues an asynchronous copy of the loop's sticky ``done`` flag into pinned
    host memory, followed by an event, and answers True once an earlier copy has landed
    (``Event.query`` does not block) showing the flag set. Iterations after ``done`` change
    nothing, so the result never depends on when the loop is left."""

    def __init__(self, n: int):
        self.flags = torch.zeros(n, dtype=torch.bool, pin_memory=True)
        self.events: list = []
        self.seen = 0

    def stop(self, done: torch.Tensor) -> bool:
        self.flags[len(self.events)].copy_(done, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        while self.seen < len(self.events) and self.events[self.seen].query():
            if bool(self.flags[self.seen]):
                return True
            self.seen += 1
        return False


def kdcl_linear_weights(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """KDCL-linear weights ``a = argmin_{a ∈ simplex} CE(Σ_k a_k z_k, y)`` (float64, K,).

    Computed in torch, in float64 on the logits' device, and returned there. Convex in ``a``;
    solved by a deterministic projected Newton method: start at the best of the uniform
    average and the K single students, then at most ``_LINEAR_MAX_NEWTON`` steps, each
    minimising the exact quadratic model (Hessian plus a 1e-10 relative ridge) over the
    simplex exactly (:func:`_simplex_qp_supports`; an active-set solver above
    ``_QP_ENUMERATE_MAX_K`` students), followed by Armijo backtracking over the step sizes
    1, ½, …, 2^−29 (the first one accepted is taken). A step is taken only if it lowers the
    CE; the method stops once the Newton decrement is below ``_LINEAR_TOL`` or no step lowers
    the CE. Off the CPU the solve never synchronises with the host: the steps run as masked
    updates (a stopped solve stays put), every step size is tried at once, and the loop runs
    all ``_LINEAR_MAX_NEWTON`` steps, or on CUDA ends once an asynchronous copy of the stop
    flag shows it set (:class:`_DonePoll`). On the CPU (and, above ``_QP_ENUMERATE_MAX_K``
    students, whose active-set QP is driven from the host, everywhere) the same method stops
    early and tries the step sizes one by one. Every step is monotone, so ``CE(result) ≤
    min(CE(uniform), CE(z_k) for all k)``. Same inputs → bit-identical weights.
    """
    members = _stack_members("logits", logits)
    dev = members[0].device
    early_exit = dev.type == "cpu" or len(members) > _QP_ENUMERATE_MAX_K
    poll = None
    if dev.type == "cuda" and not early_exit and not torch.cuda.is_current_stream_capturing():
        poll = _DonePoll(_LINEAR_MAX_NEWTON)
    return _linear_weights(members, labels, early_exit, poll)


def _linear_weights(members: list[torch.Tensor], labels: torch.Tensor, early_exit: bool,
                    poll=None) -> torch.Tensor:
    """:func:`kdcl_linear_weights`. With ``early_exit`` the loops read flags on the host (free
    on the CPU); without it, for K ≤ ``_QP_ENUMERATE_MAX_K``, nothing is read back, and the
    Newton loop ends early only when ``poll.stop(done)`` says so."""
    k = len(members)
    dev = members[0].device
    f64 = torch.float64
    if k == 1:
        return torch.ones(1, dtype=f64, device=dev)
    with torch.no_grad():
        z = torch.stack([m.detach() for m in members]).to(f64)       # K×B×C
        y = labels.detach().to(device=dev, dtype=torch.long)
        _, b, c = z.shape
        zf = z.reshape(k, b * c)
        zy_sum = z.gather(2, y.view(1, b, 1).expand(k, b, 1)).sum((1, 2))   # Σ_b z_k[b, y_b]
        systems = _support_systems(k, f64, dev) if k <= _QP_ENUMERATE_MAX_K else None
        ridge_eye = torch.eye(k, dtype=f64, device=dev) * (1e-10 / k)
        if not early_exit:
            halvings = _LINEAR_MAX_HALVINGS
            steps = torch.pow(torch.full((halvings,), 0.5, dtype=f64, device=dev),
                              torch.arange(halvings, dtype=f64, device=dev))      # 1, ½, …
            y_steps = y.repeat(halvings)

        # Start: the best of uniform and every single student (a vertex).
        ce_single = F.cross_entropy(z.view(k * b, c), y.repeat(k), reduction="none").view(k, b).mean(1)
        uniform = torch.full((k,), 1.0 / k, dtype=f64, device=dev)
        f_uniform = _linear_ce(uniform.unsqueeze(0), zf, y, b, c)[0]
        ce_best, best = ce_single.min(0)
        use_vertex = ce_best < f_uniform
        a = torch.where(use_vertex, (torch.arange(k, device=dev) == best).to(f64), uniform)
        f = torch.where(use_vertex, ce_best, f_uniform)
        going = torch.ones((), dtype=torch.bool, device=dev)

        for _ in range(_LINEAR_MAX_NEWTON):
            p = torch.softmax((a @ zf).view(b, c), 1)
            pz = z * p                                                 # K×B×C
            m = pz.sum(2)                                              # K×B: E_p[z_k]
            g = (m.sum(1) - zy_sum) / b                                # ∇ CE
            h = torch.addmm(pz.view(k, b * c) @ zf.T, m, m.T, alpha=-1.0)
            h = (h + h.T) * (0.5 / b)                                  # ∇² CE (PSD), symmetric
            h = torch.addcmul(h, ridge_eye, h.trace().clamp_min(k * 1e-12))   # + ridge·I
            c_qp = torch.addmv(g, h, a, alpha=-1.0)                    # g − H a
            if systems is not None:
                x = _simplex_qp_supports(h, c_qp, systems)
            else:
                x = _simplex_qp_active_set(h, c_qp, a)
            d = x - a
            slope = g @ d
            if early_exit:   # as below, reading the flags on the host
                if not bool(slope < -_LINEAR_TOL):
                    break
                t, accepted = 1.0, False
                for _ in range(_LINEAR_MAX_HALVINGS):
                    cand = (a + t * d).clamp_min(0.0)
                    cand = cand / cand.sum()
                    f_new = _linear_ce(cand.unsqueeze(0), zf, y, b, c)[0]
                    if bool(f_new <= f + 1e-4 * t * slope):
                        accepted = True
                        break
                    t *= 0.5
                if not accepted or not bool(f_new < f):
                    break
                a, f = cand, f_new
                continue
            cands = torch.addcmul(a, steps.unsqueeze(1), d).clamp_min(0.0)
            cands = cands / cands.sum(1, keepdim=True)                 # J×K
            f_c = _linear_ce(cands, zf, y_steps, b, c)
            armijo = f_c <= torch.addcmul(f, steps, slope, value=1e-4)
            first = armijo.to(torch.uint8).argmax().view(1)            # the first accepted
            f_new = f_c.index_select(0, first)[0]
            going = going & armijo.any() & (f_new < f) & (slope < -_LINEAR_TOL)
            a = torch.where(going, cands.index_select(0, first)[0], a)
            f = torch.where(going, f_new, f)
            if poll is not None and poll.stop(~going):
                break
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

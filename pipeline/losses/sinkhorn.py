"""Batched entropic optimal transport with uniform marginals, and its exact gradient.

Problem, per sequence b (tokens i < N on one side, j < M on the other, padding masked out):

    T* = argmin_T <T, C> - eps * H(T)   s.t.  T 1 = a,  T^T 1 = b,   a_i = 1/N_valid,  b_j = 1/M_valid
    H(T) = -sum_ij T_ij log T_ij        (Shannon entropy, 0 log 0 = 0)

so T*_ij = exp((f_i + g_j - C_ij) / eps) with dual potentials f, g found by Sinkhorn.

Two objectives can be differentiated (`ot_loss`):
- "linear":      <T*, C>, the loss of the user's original design notes. T* depends on C, so dL/dC != T*; the
                 gradient comes from implicit differentiation of the Sinkhorn fixed point (derivation at
                 `_linear_grad`).
- "regularized": <T*, C> - eps * H(T*) = <T*, C> + eps * sum T* log T*. By the envelope theorem its
                 gradient is exactly T* (the plan is optimal, so moving it changes the value only to second
                 order).

Sinkhorn runs under torch.no_grad(): no iteration ever records an autograd graph, whatever the objective.
Costs are shifted per row and column before iterating (plan unchanged), which keeps float32 accurate for
small eps. Use float32 or float64 costs (the losses upcast half precision). Imports only torch.
"""
import math
from typing import NamedTuple

import torch

from pipeline.losses.checks import check_mask, check_positive


class SinkhornResult(NamedTuple):
    plan: torch.Tensor     # (B, N, M) T*, exactly 0 on padding; detached
    f: torch.Tensor        # (B, N) dual potential of the rows, 0 on padding
    g: torch.Tensor        # (B, M) dual potential of the columns, 0 on padding
    n_iters: torch.Tensor  # (B,) long, Sinkhorn iterations each sequence ran (0 for empty problems)
    err: torch.Tensor      # (B,) L1 marginal error of the returned plan, rows + columns


def default_tol(dtype: torch.dtype) -> float:
    """L1 marginal-error tolerance (total mass 1) that the dtype can actually reach.

    float64 goes far below 1e-6; float32 bottoms out at a few 1e-7 (each of N row sums carries ~1e-7 relative
    rounding), so a tighter float32 tolerance would just run to max_iter.
    """
    return 1e-6 if dtype == torch.float64 else 1e-5


def valid_masks(a_mask: torch.Tensor, b_mask: torch.Tensor):
    """Masks of the tokens that take part in OT: a sequence with no valid token on one side is an empty
    problem (no mass anywhere), so its tokens on the other side are dropped too."""
    a_ok = a_mask & b_mask.any(-1, keepdim=True)  # (B, N)
    b_ok = b_mask & a_mask.any(-1, keepdim=True)  # (B, M)
    return a_ok, b_ok


def _uniform(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (B, N) mass 1/N_valid on valid tokens, 0 on padding
    return mask.to(dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(dtype)


# Kernel-domain iterations multiply by K = exp(-C/eps) (shifted C, so entries in [exp(-max), 1]) and keep
# exp(v) in range: safe while max C/eps stays well inside the dtype's exp range (float32: e^88, float64:
# e^709). Beyond that K underflows to 0 and whole rows vanish; the log domain has no such limit.
KERNEL_MAX = {torch.float32: 50.0, torch.float64: 500.0}
# Over-relaxation: 1.9 diverged on the benchmark's N = 1024, eps = 0.05 problem, 1.7 did not.
OMEGA_MAX = 1.8


def choose_domain(spread: float, dtype: torch.dtype) -> str:
    """"kernel" when the largest shifted cost over eps is safe in `dtype` (see KERNEL_MAX), else "log"."""
    return "kernel" if spread <= KERNEL_MAX.get(dtype, KERNEL_MAX[torch.float32]) else "log"


def _young_omega(mu2: torch.Tensor) -> torch.Tensor:
    """Young's optimal SOR relaxation 2 / (1 + sqrt(1 - mu^2)), mu^2 = the per-iteration contraction of plain
    (Gauss-Seidel-like) Sinkhorn (Thibault et al. 2017 apply it to Sinkhorn)."""
    return 2.0 / (1.0 + torch.sqrt((1.0 - mu2).clamp_min(0.0)))


def _row_update(Kd, v, log_a, ok, kernel: bool):
    """(b, N, M), (b, M) -> (b, N): u = log a - log sum_j exp(v_j - Ce_ij); Kd = K (kernel) or Ce (log)."""
    if kernel:
        s = torch.bmm(Kd, v.exp()[:, :, None])[:, :, 0].log()  # (b, N) one matrix-vector product
    else:
        s = torch.logsumexp(v[:, None, :] - Kd, dim=2)  # (b, N)
    return torch.where(ok, log_a - s, 0.0)


def _col_update(Kd, u, log_b, ok, kernel: bool):
    """(b, N, M), (b, N) -> (b, M): v = log b - log sum_i exp(u_i - Ce_ij)."""
    if kernel:
        s = torch.bmm(Kd.transpose(1, 2), u.exp()[:, :, None])[:, :, 0].log()  # (b, M)
    else:
        s = torch.logsumexp(u[:, :, None] - Kd, dim=1)  # (b, M)
    return torch.where(ok, log_b - s, 0.0)


@torch.no_grad()
def sinkhorn(C: torch.Tensor, a_mask: torch.Tensor, b_mask: torch.Tensor, eps: float,
             tol: float | None = None, max_iter: int = 1000, *, domain: str = "auto", check_every: int = 10,
             overrelax: bool = True) -> SinkhornResult:
    """Entropic OT between uniform marginals over the valid tokens, batched.

    C: (B, N, M) cost (any finite values; entries on padding are ignored, they may be garbage).
    a_mask: (B, N) bool, b_mask: (B, M) bool, True on real tokens (other dtypes: TypeError). N != M and
         N_valid != M_valid are fine.
    eps: entropic regularisation (1/lambda in the user's original design notes), > 0 (else ValueError).
    tol: a sequence stops once the L1 marginal error (rows + columns) of its plan is <= tol; default
         `default_tol(C.dtype)`. Converged sequences leave the working batch (no more work is spent on them),
         so a sequence's result does not depend on its batch mates (for a fixed domain).
    max_iter: cap on iterations; check `err` / `n_iters` of the result to see who hit it.
    domain: "kernel" (matrix-vector products with K = exp(-C/eps): no exp per element per iteration),
         "log" (logsumexp: safe for any eps) or "auto" (kernel when `choose_domain` says it is safe for the
         whole batch). Both iterate the same scaled log-potentials, so they agree to rounding.
    check_every: iterations between convergence checks. A check is the only host synchronisation (on a GPU
         `.any()` waits for the device), so sequences stop on a multiple of it.
    overrelax: adaptive over-relaxation u <- u + omega (u_update - u), per sequence. The first window is a
         transient; from the second check on, each window's error decay gives the contraction rate of
         plain Sinkhorn (directly when omega = 1, through SOR's eigenvalue relation otherwise) and omega is
         raised towards Young's optimum, capped at OMEGA_MAX. If the error grows over a window, the sequence
         returns to its last checked state and the excess omega - 1 is halved (and capped below that value
         from then on). Planning measured omega = 1.5 saving ~3x iterations and a fixed 1.8 diverging, hence
         adaptive.
    """
    B, N, M = C.shape
    check_mask(a_mask, "a_mask")  # an integer mask would turn ~ into -1/-2 and & into bitwise garbage
    check_mask(b_mask, "b_mask")
    check_positive(eps, "eps")
    tol = default_tol(C.dtype) if tol is None else tol
    if domain not in ("auto", "kernel", "log"):
        raise ValueError(f"domain must be 'auto', 'kernel' or 'log', got {domain!r}")
    a_ok, b_ok = valid_masks(a_mask, b_mask)
    log_a = _uniform(a_ok, C.dtype).log()  # (B, N), -inf on padding (only ever used through where)
    log_b = _uniform(b_ok, C.dtype).log()  # (B, M)
    pair = a_ok[:, :, None] & b_ok[:, None, :]  # (B, N, M)
    # +inf cost on padding makes exp(-C/eps) exactly 0 there, so padding never takes mass in the softmins
    C = torch.where(pair, C, math.inf)  # (B, N, M)
    # Subtracting a constant per row (then per column) from C leaves the plan unchanged (f, g absorb it) but
    # shrinks |C/eps| from max(C)/eps to about the spread of C over eps. That matters in float32: the
    # potentials' rounding, ~6e-8 * |C/eps|, sets the floor of the marginal error (1 - rowsoftmax costs sit
    # near 1 with a spread of a few 1e-2, so at eps = 3e-3 the unshifted floor would be ~2e-5 > tol), and it
    # is what makes the kernel domain usable at all for small eps.
    c_row = torch.where(a_ok, C.amin(2), 0.0)  # (B, N)
    c_col = torch.where(b_ok, (C - c_row[:, :, None]).amin(1), 0.0)  # (B, M)
    Ce = (C - c_row[:, :, None] - c_col[:, None, :]) / eps  # (B, N, M) >= 0 on valid pairs, inf on padding
    if domain == "auto":
        spread = float(torch.where(pair, Ce, 0.0).amax()) if pair.any() else 0.0
        domain = choose_domain(spread, C.dtype)
    kernel = domain == "kernel"

    # u = f/eps, v = g/eps (scaled log-potentials) in both domains; the kernel domain exponentiates only
    # the vectors: exp(u_i) = a_i / sum_j K_ij exp(v_j) is the textbook scaling update, in logs.
    u = C.new_zeros(B, N)
    v = C.new_zeros(B, M)
    n_iters = torch.zeros(B, dtype=torch.long, device=C.device)
    idx = a_ok.any(-1).nonzero()[:, 0]  # (b,) the working batch; empty problems are done before they start
    # working-batch state, compacted whenever sequences converge
    Kd = (torch.exp(-Ce) if kernel else Ce)[idx]  # (b, N, M), K exactly 0 on padding
    ao, bo, la, lb = a_ok[idx], b_ok[idx], log_a[idx], log_b[idx]
    uw, vw = u[idx], v[idx]  # (b, N), (b, M)
    omega = C.new_ones(len(idx))  # (b,)
    cap = C.new_full((len(idx),), OMEGA_MAX)  # (b,) lowered after a failed omega
    err_prev = C.new_full((len(idx),), math.inf)
    u_snap, v_snap = uw, vw
    it = 0
    while len(idx) and it < max_iter:
        u_new = _row_update(Kd, vw, la, ao, kernel)  # (b, N)
        if it % check_every == 0:  # error of the current plan (uw, vw): rows for free, columns cost an update
            err = ((la.exp() * torch.expm1(uw - u_new).abs()).sum(-1)
                   + (lb.exp() * torch.expm1(vw - _col_update(Kd, uw, lb, bo, kernel)).abs()).sum(-1))  # (b,)
            if overrelax:
                ratio = err / err_prev  # (b,) error decay over the last window
                bad = (omega > 1) & ~(ratio <= 1)  # grew (or went non-finite): back to the last check
                cap = torch.where(bad, 1 + 0.75 * (omega - 1), cap)
                omega = torch.where(bad, 1 + 0.5 * (omega - 1), omega)
                uw, vw = torch.where(bad[:, None], u_snap, uw), torch.where(bad[:, None], v_snap, vw)
                err = torch.where(bad, err_prev, err)
                if bad.any():  # rare: recompute the row update from the restored state only then
                    u_new = torch.where(bad[:, None], _row_update(Kd, vw, la, ao, kernel), u_new)
                lam = ratio.clamp(1e-30, 1.0) ** (1.0 / check_every)  # observed per-iteration rate
                mu2 = (lam + omega - 1) ** 2 / (lam * omega ** 2)  # plain rate (= lam when omega = 1)
                target = torch.minimum(_young_omega(mu2), cap)
                raise_ = ~bad & (it >= 2 * check_every) & (ratio < 1) & (target > omega)
                omega = torch.where(raise_, target, omega)
                u_snap, v_snap, err_prev = uw, vw, err
            done = err <= tol
            if done.any():  # write the converged ones back and drop them from the working batch
                u[idx[done]], v[idx[done]], n_iters[idx[done]] = uw[done], vw[done], it
                keep = ~done
                idx, Kd, ao, bo, la, lb = idx[keep], Kd[keep], ao[keep], bo[keep], la[keep], lb[keep]
                uw, vw, u_new, omega, cap = uw[keep], vw[keep], u_new[keep], omega[keep], cap[keep]
                u_snap, v_snap, err_prev = u_snap[keep], v_snap[keep], err_prev[keep]
                if not len(idx):
                    break
        w = omega[:, None]
        uw = uw + w * (u_new - uw)
        vw = vw + w * (_col_update(Kd, uw, lb, bo, kernel) - vw)
        it += 1
    if len(idx):  # hit max_iter
        u[idx], v[idx], n_iters[idx] = uw, vw, it

    plan = torch.exp(u[:, :, None] + v[:, None, :] - Ce)  # (B, N, M), exp(-inf) = 0 on padding
    a, b = log_a.exp(), log_b.exp()
    err = (plan.sum(2) - a).abs().sum(-1) + (plan.sum(1) - b).abs().sum(-1)  # (B,)
    return SinkhornResult(plan, eps * u + c_row, eps * v + c_col, n_iters, err)


# ---------------------------------------------------------------------------------------------------------
# Implicit gradient of the linear objective <T*, C>
#
# Optimality: T_ij = exp((f_i + g_j - C_ij)/eps) with T 1 = a, T^T 1 = b. Perturb C by dC:
#     dT_ij = T_ij (df_i + dg_j - dC_ij) / eps
# and keep the marginals fixed (sum_j dT_ij = 0, sum_i dT_ij = 0):
#     a_i df_i + sum_j T_ij dg_j = sum_j T_ij dC_ij       i.e.  H [df; dg] = J(dC) := [(T.dC) 1; (T.dC)^T 1]
#     sum_i T_ij df_i + b_j dg_j = sum_i T_ij dC_ij              H = [[diag(a), T], [T^T, diag(b)]]
# Then d<T, C> = sum T.dC + sum C.dT
#             = sum T_ij dC_ij (1 - C_ij/eps) + (1/eps) [r; s] . [df; dg],    r = (T.C) 1,  s = (T.C)^T 1
# With H symmetric, [r; s] . H^-1 J(dC) = (H^-1 [r; s]) . J(dC) = sum T_ij dC_ij (alpha_i + beta_j) for
# [alpha; beta] = H^-1 [r; s] / eps (scaled by 1/eps), hence
#     d<T*, C>/dC_ij = T_ij (1 - C_ij/eps + alpha_i + beta_j).
# H is PSD: [x; y]^T H [x; y] = sum_ij T_ij (x_i + y_j)^2 (using a = T 1, b = T^T 1), with null direction
# (1, -1). [r; s] is orthogonal to it (sum r = sum s = <T, C>) and alpha_i + beta_j does not see it, so any
# solution works. We use the plan's own marginals on the diagonal so that the null direction is exact even
# when Sinkhorn stopped at a finite tolerance.
# ---------------------------------------------------------------------------------------------------------

def default_cg_tol(dtype: torch.dtype) -> float:
    """Relative residual at which CG stops; float32 stalls around 1e-6."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def _center(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # (B, M) remove the mean over valid entries: projects onto the complement of the null direction 1
    return torch.where(mask, x - (x * mask).sum(-1, keepdim=True) / n, 0.0)


def _cg(matvec, rhs: torch.Tensor, diag: torch.Tensor, mask: torch.Tensor, tol: float, max_iter: int):
    """Batched Jacobi-preconditioned CG for S x = rhs, S PSD with null space span(1) on the valid entries.

    rhs, diag, mask: (B, M). Everything is kept in 1^perp (rhs, residuals and preconditioned residuals are
    re-centred), otherwise float32 rounding feeds the null direction and CG stalls, then diverges. Items whose
    relative residual is below tol are frozen (zero step) while the others continue.
    Returns x (B, M), the CG iterations per item (B,) and whether each item reached tol (B,) bool.
    """
    n = mask.sum(-1, keepdim=True).clamp_min(1).to(rhs.dtype)  # (B, 1)
    inv_diag = torch.where(mask & (diag > 0), 1.0 / diag, 0.0)
    rhs = _center(rhs, mask, n)
    x = torch.zeros_like(rhs)
    res = rhs
    z = _center(inv_diag * res, mask, n)
    p = z
    rz = (res * z).sum(-1)  # (B,)
    thresh = tol * rhs.norm(dim=-1)
    active = res.norm(dim=-1) > thresh
    iters = torch.zeros_like(active, dtype=torch.long)
    for _ in range(max_iter):
        if not active.any():
            break
        Sp = _center(matvec(p), mask, n)  # (B, M)
        pSp = (p * Sp).sum(-1)
        step = torch.where(active & (pSp > 0), rz / torch.where(pSp > 0, pSp, 1.0), 0.0)  # (B,)
        x = x + step[:, None] * p
        res = res - step[:, None] * Sp
        iters += active
        active = active & (res.norm(dim=-1) > thresh) & (pSp > 0)
        z = _center(inv_diag * res, mask, n)
        rz_new = (res * z).sum(-1)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x, iters, res.norm(dim=-1) <= thresh


def _solve_dual_system(T, r, s, a_ok, b_ok, tol, max_iter):
    """Solve [[diag(T 1), T], [T^T, diag(T^T 1)]] [x; y] = [r; s] (up to the null direction (1, -1)).

    T: (B, N, M), r: (B, N), s: (B, M). Eliminates the larger side and runs CG on the Schur complement of
    the smaller one, S = diag(T^T 1) - T^T diag(1 / T 1) T, which has the single null direction 1.
    """
    if T.shape[1] < T.shape[2]:  # keep the CG system on the smaller side
        y, x, iters, conv = _solve_dual_system(T.transpose(1, 2), s, r, b_ok, a_ok, tol, max_iter)
        return x, y, iters, conv
    row = T.sum(2)  # (B, N) = a up to the Sinkhorn tolerance
    col = T.sum(1)  # (B, M)
    inv_row = torch.where(a_ok & (row > 0), 1.0 / row, 0.0)  # (B, N)

    def schur(y):  # (B, M) -> (B, M)
        Ty = torch.bmm(T, y[:, :, None])[:, :, 0]  # (B, N)
        return col * y - torch.bmm(T.transpose(1, 2), (inv_row * Ty)[:, :, None])[:, :, 0]

    # x = (r - T y) / row, substituted into the second block row
    rhs = s - torch.bmm(T.transpose(1, 2), (inv_row * r)[:, :, None])[:, :, 0]  # (B, M)
    diag = col - (T * T * inv_row[:, :, None]).sum(1)  # (B, M) >= 0 since T_ij <= row_i
    y, iters, conv = _cg(schur, rhs, diag, b_ok, tol, max_iter)
    x = (r - torch.bmm(T, y[:, :, None])[:, :, 0]) * inv_row
    return x, y, iters, conv


# Iteration cap of the float32 CG attempt in `_linear_grad` (the float64 redo gets cg_max_iter).
CG_MAX_ITER_LOW = 64


def _grad_from_duals(plan, C0, eps, a_ok, b_ok, cg_tol, cg_max_iter):
    """(grad (B, N, M), ok (B,) bool: CG converged and grad finite, CG iterations (B,)) in plan's dtype."""
    TC = plan * C0  # (B, N, M)
    r = TC.sum(2) / eps  # (B, N)
    s = TC.sum(1) / eps  # (B, M)
    alpha, beta, iters, conv = _solve_dual_system(plan, r, s, a_ok, b_ok, cg_tol, cg_max_iter)
    grad = plan * (1.0 - C0 / eps + alpha[:, :, None] + beta[:, None, :])  # (B, N, M)
    return grad, conv & torch.isfinite(grad).all(2).all(1), iters


def _linear_grad(plan, C0, eps, a_ok, b_ok, cg_tol, cg_max_iter):
    """d<T*, C>/dC (B, N, M) = T (1 - C/eps + alpha_i + beta_j); C0 is C with padding zeroed.

    The dual system is solved in the plan's dtype first (float32 during training: half the memory traffic
    of float64, and CG needs only a handful of iterations on converged plans). A sequence whose float32 CG
    did not reach cg_tol or gave a non-finite gradient - CG on a plan from an unconverged Sinkhorn (max_iter
    reached) can stall at its rounding floor and break down into inf/NaN - is solved again in float64. The
    float32 attempt gets at most CG_MAX_ITER_LOW iterations: converged plans need a handful (3-60 measured),
    and a stalled float32 CG would otherwise spin to cg_max_iter before the float64 redo. One
    whose gradient is still not finite gets a zero gradient rather than poisoning every weight through
    gradient clipping.
    """
    first_max = cg_max_iter if plan.dtype == torch.float64 else min(cg_max_iter, CG_MAX_ITER_LOW)
    grad, ok, iters = _grad_from_duals(plan, C0, eps, a_ok, b_ok, cg_tol, first_max)
    if plan.dtype != torch.float64 and not ok.all():
        redo = (~ok).nonzero()[:, 0]
        g64, _, it64 = _grad_from_duals(plan[redo].double(), C0[redo].double(), eps, a_ok[redo], b_ok[redo],
                                        cg_tol, cg_max_iter)
        grad[redo], iters[redo] = g64.to(grad.dtype), it64
    ok = torch.isfinite(grad).all(2).all(1)  # (B,)
    return torch.where(ok[:, None, None], grad, 0.0), iters


class _OTValue(torch.autograd.Function):
    """Per-sequence OT value for a plan that is already optimal for C; backward supplies dL/dC."""

    @staticmethod
    def forward(ctx, C, plan, a_ok, b_ok, eps, objective, cg_tol, cg_max_iter):
        pair = a_ok[:, :, None] & b_ok[:, None, :]
        C0 = torch.where(pair, C, 0.0)  # (B, N, M) padding may hold garbage (inf/NaN); T is 0 there anyway
        value = (plan * C0).sum((1, 2))  # (B,)
        if objective == "regularized":
            value = value + eps * torch.xlogy(plan, plan).sum((1, 2))  # - eps * H(T), 0 log 0 = 0
        ctx.save_for_backward(C0, plan, a_ok, b_ok)
        ctx.eps, ctx.objective, ctx.cg_tol, ctx.cg_max_iter = eps, objective, cg_tol, cg_max_iter
        return value

    @staticmethod
    def backward(ctx, grad_value):  # (B,)
        C0, plan, a_ok, b_ok = ctx.saved_tensors
        if ctx.objective == "regularized":
            grad = plan  # envelope theorem
        else:
            with torch.autocast(C0.device.type, enabled=False):  # see ot_loss
                grad, _ = _linear_grad(plan, C0, ctx.eps, a_ok, b_ok, ctx.cg_tol, ctx.cg_max_iter)
        return grad * grad_value[:, None, None], None, None, None, None, None, None, None


def ot_loss(C: torch.Tensor, a_mask: torch.Tensor, b_mask: torch.Tensor, eps: float,
            objective: str = "linear", *, tol: float | None = None, max_iter: int = 1000,
            cg_tol: float | None = None, cg_max_iter: int = 1000, domain: str = "auto", check_every: int = 10,
            overrelax: bool = True) -> tuple[torch.Tensor, SinkhornResult]:
    """Differentiable per-sequence entropic OT loss.

    C: (B, N, M) cost, a_mask (B, N), b_mask (B, M) bool. eps: entropic regularisation.
    objective: "linear" -> <T*, C> with its exact implicit gradient (CG on the dual Hessian, no unrolling);
               "regularized" -> <T*, C> - eps H(T*), H(T) = -sum T log T, gradient T* (envelope theorem).
    domain, check_every, overrelax: solver options, see `sinkhorn`.
    Returns (loss (B,), SinkhornResult): the loss is 0 (with zero gradient) for sequences that have no valid
    token on one side; the result carries n_iters / err for logging and the detached plan.
    """
    if objective not in ("linear", "regularized"):
        raise ValueError(f"objective must be 'linear' or 'regularized', got {objective!r}")
    # Under mixed precision (Trainer's bf16 autocast on a GPU) bmm would silently run in bf16: the kernel-domain
    # iterations and the CG solve need the dtype of C, so autocast is switched off for the solver.
    with torch.autocast(C.device.type, enabled=False):
        res = sinkhorn(C, a_mask, b_mask, eps, tol=tol, max_iter=max_iter, domain=domain,
                       check_every=check_every, overrelax=overrelax)
    a_ok, b_ok = valid_masks(a_mask, b_mask)
    cg_tol = default_cg_tol(C.dtype) if cg_tol is None else cg_tol
    loss = _OTValue.apply(C, res.plan, a_ok, b_ok, eps, objective, cg_tol, cg_max_iter)
    return loss, res

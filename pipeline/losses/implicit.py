"""The differentiable OT loss: the value of the entropic plan and its exact gradient (implicit
differentiation of the optimality conditions, no unrolling). Imports only torch.

Implicit gradient of the linear objective <T*, C>:

Optimality: T_ij = exp((f_i + g_j - C_ij)/eps) with T 1 = a, T^T 1 = b. Perturb C by dC:
    dT_ij = T_ij (df_i + dg_j - dC_ij) / eps
and keep the marginals fixed (sum_j dT_ij = 0, sum_i dT_ij = 0):
    a_i df_i + sum_j T_ij dg_j = sum_j T_ij dC_ij       i.e.  H [df; dg] = J(dC) := [(T.dC) 1; (T.dC)^T 1]
    sum_i T_ij df_i + b_j dg_j = sum_i T_ij dC_ij              H = [[diag(a), T], [T^T, diag(b)]]
Then d<T, C> = sum T.dC + sum C.dT
            = sum T_ij dC_ij (1 - C_ij/eps) + (1/eps) [r; s] . [df; dg],    r = (T.C) 1,  s = (T.C)^T 1
With H symmetric, [r; s] . H^-1 J(dC) = (H^-1 [r; s]) . J(dC) = sum T_ij dC_ij (alpha_i + beta_j) for
[alpha; beta] = H^-1 [r; s] / eps (scaled by 1/eps), hence
    d<T*, C>/dC_ij = T_ij (1 - C_ij/eps + alpha_i + beta_j).
H is PSD: [x; y]^T H [x; y] = sum_ij T_ij (x_i + y_j)^2 (using a = T 1, b = T^T 1), with null direction
(1, -1). [r; s] is orthogonal to it (sum r = sum s = <T, C>) and alpha_i + beta_j does not see it, so any
solution works. The plan's own marginals sit on the diagonal so that the null direction is exact even when
Sinkhorn stopped at a finite tolerance. eps may differ per sequence (relative eps): every formula is per
sequence.
"""

from typing import Literal

import torch

from pipeline.losses.dual import PlanOperator, solve_dual_system
from pipeline.losses.sinkhorn import SinkhornResult, eps_vector, sinkhorn, valid_masks

EpsScale = Literal["absolute", "std"]


def default_cg_tol(dtype: torch.dtype) -> float:
    """Relative residual at which CG stops; float32 stalls around 1e-6."""
    return 1e-12 if dtype == torch.float64 else 1e-6


# Iteration cap of the float32 CG attempt in `_linear_grad` (the float64 redo gets cg_max_iter).
CG_MAX_ITER_LOW = 64


def _grad_from_duals(plan, C0, eps, a_ok, b_ok, cg_tol, cg_max_iter):
    """(grad (B, N, M), ok (B,) bool: CG converged and grad finite, CG iterations (B,)) in plan's dtype."""
    e = eps.to(plan.dtype)[:, None]  # (B, 1)
    TC = plan * C0  # (B, N, M)
    r = TC.sum(2) / e  # (B, N)
    s = TC.sum(1) / e  # (B, M)
    alpha, beta, iters, conv = solve_dual_system(PlanOperator.of(plan), r, s, a_ok, b_ok, cg_tol, cg_max_iter)
    grad = plan * (1.0 - C0 / e[:, :, None] + alpha[:, :, None] + beta[:, None, :])  # (B, N, M)
    return grad, conv & torch.isfinite(grad.sum((1, 2))), iters  # a non-finite entry makes its sum non-finite


def _linear_grad(plan, C0, eps, a_ok, b_ok, cg_tol, cg_max_iter):
    """d<T*, C>/dC (B, N, M) = T (1 - C/eps + alpha_i + beta_j); C0 is C (or C - f - g, the same gradient)
    with padding zeroed, eps (B,).

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
        g64, _, it64 = _grad_from_duals(
            plan[redo].double(), C0[redo].double(), eps[redo].double(), a_ok[redo], b_ok[redo], cg_tol, cg_max_iter
        )
        grad[redo], iters[redo] = g64.to(grad.dtype), it64
    ok = torch.isfinite(grad.sum((1, 2)))  # (B,)
    return (grad if bool(ok.all()) else torch.where(ok[:, None, None], grad, 0.0)), iters


class _OTValue(torch.autograd.Function):
    """Per-sequence OT value for a plan that is already optimal for C; backward supplies dL/dC."""

    @staticmethod
    def forward(ctx, C, plan, f, g, a_ok, b_ok, eps, objective, cg_tol, cg_max_iter):
        pair = a_ok[:, :, None] & b_ok[:, None, :]
        C0 = torch.where(pair, C, 0.0)  # (B, N, M) padding may hold garbage (inf/NaN); T is 0 there anyway
        value = (plan * C0).sum((1, 2))  # (B,)
        if objective == "regularized":
            value = value + eps * torch.xlogy(plan, plan).sum((1, 2))  # - eps * H(T), 0 log 0 = 0
        # The gradient formula is unchanged by C_ij -> C_ij - f_i - g_j (alpha, beta absorb constants per row
        # and column), and C - f - g = -eps log T is O(eps log N) where C itself is O(1): at eps = 0.01 the
        # shifted system's right-hand side is ~10x smaller relative to what cancels in 1 - C/eps + alpha +
        # beta, so float32 CG at its 1e-6 floor leaves ~10x less gradient error.
        Cg = torch.where(pair, C - f[:, :, None] - g[:, None, :], 0.0)  # (B, N, M)
        ctx.save_for_backward(Cg, plan, a_ok, b_ok, eps)
        ctx.objective, ctx.cg_tol, ctx.cg_max_iter = objective, cg_tol, cg_max_iter
        return value

    @staticmethod
    def backward(ctx, grad_value):  # (B,)
        C0, plan, a_ok, b_ok, eps = ctx.saved_tensors
        if ctx.objective == "regularized":
            grad = plan  # envelope theorem
        else:
            with torch.autocast(C0.device.type, enabled=False):  # see ot_loss
                grad, _ = _linear_grad(plan, C0, eps, a_ok, b_ok, ctx.cg_tol, ctx.cg_max_iter)
        return grad * grad_value[:, None, None], None, None, None, None, None, None, None, None, None


def relative_eps(C: torch.Tensor, a_ok: torch.Tensor, b_ok: torch.Tensor, eps) -> torch.Tensor:
    """(B,) eps x the standard deviation of each sequence's valid costs (OTT-JAX's relative epsilon); eps: a
    float or (B,). Computed from C without gradient (the solver's setting).

    Why std: C = 1 - rowsoftmax(S) over M tokens has mean exactly 1 - 1/M whatever S is, so "mean" would be
    absolute eps in disguise, while its spread shrinks like 1/M: the same absolute eps is a sharper plan at
    64 tokens than at 2,048. eps x std(C) means the same sharpness at every length.
    """
    with torch.no_grad():
        pair = a_ok[:, :, None] & b_ok[:, None, :]
        n = pair.sum((1, 2)).clamp_min(2).to(C.dtype)
        Cv = torch.where(pair, C, 0.0)
        mean = Cv.sum((1, 2)) / n
        var = torch.where(pair, (C - mean[:, None, None]) ** 2, 0.0).sum((1, 2)) / (n - 1)
        std = var.sqrt()
        # an empty or constant problem has std 0: any eps gives the same (uniform) plan, use eps itself
        return eps * torch.where(std > 0, std, 1.0).detach()


def ot_loss(
    C: torch.Tensor,
    a_mask: torch.Tensor,
    b_mask: torch.Tensor,
    eps: float,
    objective: str = "linear",
    *,
    eps_scale: EpsScale = "absolute",
    tol: float | None = None,
    max_iter: int = 1000,
    cg_tol: float | None = None,
    cg_max_iter: int = 1000,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    **solver,
) -> tuple[torch.Tensor, SinkhornResult]:
    """Differentiable per-sequence entropic OT loss.

    C: (B, N, M) cost, a_mask (B, N), b_mask (B, M) bool. eps: entropic regularisation (> 0), absolute or
    relative to each sequence's std(C) (`eps_scale`, see `relative_eps`).
    objective: "linear" -> <T*, C> with its exact implicit gradient (CG on the dual Hessian, no unrolling);
               "regularized" -> <T*, C> - eps H(T*), H(T) = -sum T log T, gradient T* (envelope theorem).
    tol, max_iter, init and `solver` (eps_scaling, newton, domain, check_every, overrelax): see `sinkhorn`.
    Returns (loss (B,), SinkhornResult): the loss is 0 (with zero gradient) for sequences that have no valid
    token on one side; the result carries n_iters / err / converged for logging and the detached plan.
    """
    if objective not in ("linear", "regularized"):
        raise ValueError(f"objective must be 'linear' or 'regularized', got {objective!r}")
    a_ok, b_ok = valid_masks(a_mask, b_mask)
    if eps_scale not in ("absolute", "std"):
        raise ValueError(f"eps_scale must be 'absolute' or 'std', got {eps_scale!r}")
    e = eps_vector(eps, C.shape[0], C.detach())  # (B,), refuses eps <= 0
    if eps_scale == "std":
        e = relative_eps(C.detach(), a_ok, b_ok, e)
    # Under mixed precision (Trainer's bf16 autocast on a GPU) bmm would silently run in bf16: the solver's
    # products and the CG solve need the dtype of C, so autocast is switched off for them.
    with torch.autocast(C.device.type, enabled=False):
        res = sinkhorn(C.detach(), a_mask, b_mask, e, tol=tol, max_iter=max_iter, init=init, **solver)
    cg_tol = default_cg_tol(C.dtype) if cg_tol is None else cg_tol
    loss = _OTValue.apply(C, res.plan, res.f, res.g, a_ok, b_ok, e, objective, cg_tol, cg_max_iter)
    return loss, res

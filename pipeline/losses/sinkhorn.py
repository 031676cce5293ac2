"""Batched entropic optimal transport with uniform marginals: ε-scaling, Sinkhorn and a Newton finish.

Problem, per sequence b (tokens i < N on one side, j < M on the other, padding masked out):

    T* = argmin_T <T, C> - eps * H(T)   s.t.  T 1 = a,  T^T 1 = b,   a_i = 1/N_valid,  b_j = 1/M_valid
    H(T) = -sum_ij T_ij log T_ij        (Shannon entropy, 0 log 0 = 0)

so T*_ij = exp((f_i + g_j - C_ij) / eps) with dual potentials f, g.

How it is solved (measurements: bench/sinkhorn_bench.py, docs/results.md):
- ε-scaling: a sequence whose eps is small against its cost spread starts at eps_0 = spread(C) / 64 and
  shrinks eps by 0.3 per stage down to its target, each stage starting from the previous stage's potentials.
  Plain Sinkhorn's contraction rate degrades as eps shrinks; a warm start from a coarser eps keeps every stage
  short.
- Absorption: each stage iterates scalings (u, v) against the kernel K = exp((f_i + g_j - C_ij) / eps_stage)
  with the potentials so far folded in, every row maximum (and any column maximum that would underflow) shifted
  to exactly 1, so K is safe in float32 at any eps: matrix-vector products instead of a logsumexp per element,
  without the underflow that limits textbook kernel Sinkhorn to eps >~ spread / 50. Scalings that drift far from 0
  are folded into a rebuilt kernel; a sequence whose kernel iteration still goes non-finite redoes its stage in the
  log domain.
- Newton finish: in each stage, once Sinkhorn reaches NEWTON_START (or after NEWTON_AFTER iterations), damped
  Newton steps on the dual (Hessian = the system the implicit backward solves, by the same CG) finish the job;
  a sequence whose Newton step cannot improve the dual (line search fails) runs a few Sinkhorn iterations
  before trying again.
- K and K^T are both kept contiguous: x^T A as a (1, N) x (N, M) product runs ~6x faster on CPU BLAS than
  A x as (N, M) x (M, 1), so every matrix-vector product here is written as a vector-matrix one.
Converged sequences stop changing (and leave the working batch once half of it is done), so a sequence's result
does not depend on its batch mates (up to the rounding of batched products, and for a fixed domain).

Two objectives can be differentiated (`ot_loss`):
- "linear":      <T*, C>, the transport cost of the plan (the losses' default). T* depends on C, so dL/dC != T*; the
                 gradient comes from implicit differentiation of the Sinkhorn fixed point (derivation at
                 `_linear_grad`).
- "regularized": <T*, C> - eps * H(T*) = <T*, C> + eps * sum T* log T*. By the envelope theorem its
                 gradient is exactly T* (the plan is optimal, so moving it changes the value only to second
                 order).

The solver runs under torch.no_grad(): no iteration ever records an autograd graph, whatever the objective.
Use float32 or float64 costs (the losses upcast half precision). Imports only torch.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.losses.checks import check_mask, check_positive
from pipeline.losses.dual import PlanOperator, solve_dual_system, vecmat


class SinkhornResult(NamedTuple):
    plan: torch.Tensor  # (B, N, M) T*, exactly 0 on padding; detached
    f: torch.Tensor  # (B, N) dual potential of the rows (units of C), 0 on padding
    g: torch.Tensor  # (B, M) dual potential of the columns, 0 on padding
    n_iters: torch.Tensor  # (B,) long, Sinkhorn iterations + Newton steps over all eps stages (0 if empty)
    err: torch.Tensor  # (B,) L1 marginal error of the returned plan, rows + columns
    converged: torch.Tensor  # (B,) bool: reached tol, and the returned plan is finite with err <= 2 tol (empty: True)
    cost_spread: torch.Tensor | None = None  # (B,) std(C) / mean(C) over valid entries (set by the OT losses)


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


def eps_vector(eps, B: int, like: torch.Tensor) -> torch.Tensor:
    """eps as a (B,) tensor of C's dtype: a float for every sequence, or one value per sequence (each > 0)."""
    if isinstance(eps, torch.Tensor):
        e = eps.to(like.dtype).to(like.device).expand(B).clone()
        if not bool((e > 0).all()):
            raise ValueError(f"eps must be > 0, got {eps!r}")
        return e
    return like.new_full((B,), check_positive(eps, "eps"))


class Marginal(NamedTuple):
    """One side's marginal over a batch of problems: log-weights (b, n), -inf on padding (only ever read through
    torch.where), and which tokens are real (b, n) bool."""

    log: torch.Tensor
    ok: torch.Tensor

    def select(self, sel: torch.Tensor) -> "Marginal":
        return Marginal(self.log[sel], self.ok[sel])


@dataclass
class SolverState:
    """What `sinkhorn` keeps per sequence b of the whole batch while the eps stages run; `_stage` updates the rows
    of the sequences it works on in place."""

    f: torch.Tensor  # (B, N) row potentials so far, units of the shifted C
    g: torch.Tensor  # (B, M) column potentials so far
    eps: torch.Tensor  # (B,) target eps
    eps0: torch.Tensor  # (B,) the first stage's eps
    stage: torch.Tensor  # (B,) long, eps stage reached
    n_iters: torch.Tensor  # (B,) long, Sinkhorn iterations + Newton steps so far
    converged: torch.Tensor  # (B,) bool
    finished: torch.Tensor  # (B,) bool
    log_domain: torch.Tensor  # (B,) bool: the kernel iteration broke down, redo in the log domain
    plan: torch.Tensor  # (B, N, M) returned plans, filled as sequences finish
    err: torch.Tensor  # (B,) L1 marginal error of each returned plan


@dataclass(frozen=True)
class StageOptions:
    """The settings every stage of one `sinkhorn` call shares (see its arguments)."""

    tol: float
    max_iter: int
    newton: bool
    check_every: int
    overrelax: bool


def _uniform(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (B, N) mass 1/N_valid on valid tokens, 0 on padding
    return mask.to(dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(dtype)


# ε-scaling: when eps < spread(C) / EPS_START_DIVISOR (C shifted per row and column), a sequence starts at that
# eps and shrinks it by EPS_DECAY per stage. Measured (bench problem, N = 128 and 1024): with the Newton finish a
# cold start converges in 10-60 iterations down to spread / eps ~ 200, and each stage costs a kernel rebuild, so
# starting at spread / 4 was slower at eps >= 0.01; at N = 128, eps = 0.005 starting at spread / 64 took 75
# iterations against 125 cold; a cost spread of 1e4 (tests) needs the stages.
EPS_START_DIVISOR = 64.0
EPS_DECAY = 0.3
# Intermediate stages only have to hand a good start to the next one.
STAGE_TOL = 1e-2
# The final stage switches from Sinkhorn to Newton at this L1 marginal error.
NEWTON_START = 1e-2
NEWTON_AFTER = 30  # ... or after this many Sinkhorn iterations of a stage (damped Newton converges from afar)
NEWTON_MAX_STEPS = 30
NEWTON_CG_TOL = 1e-2  # inexact Newton: relative CG residual per step
NEWTON_CG_MAX_ITER = 200
LINE_SEARCH_STEPS = 10  # step halvings before a Newton step counts as failed
NEWTON_ROUNDS = 4  # Newton runs, separated by a few Sinkhorn iterations when a step stalls
NEWTON_MAX_STEP = 2.0  # largest change of a log-scaling in one Newton step
# Scalings beyond this are folded into a rebuilt kernel (exp stays far from float32's e^88).
ABSORB = 30.0
# Over-relaxation: 1.9 diverged on the benchmark's N = 1024, eps = 0.05 problem, 1.7 did not.
OMEGA_MAX = 1.8


def _young_omega(mu2: torch.Tensor) -> torch.Tensor:
    """Young's optimal SOR relaxation 2 / (1 + sqrt(1 - mu^2)), mu^2 = the per-iteration contraction of plain
    (Gauss-Seidel-like) Sinkhorn (Thibault et al. 2017 apply it to Sinkhorn)."""
    return 2.0 / (1.0 + torch.sqrt((1.0 - mu2).clamp_min(0.0)))


def _exp_shifted(x: torch.Tensor):
    """(b, P) -> exp(x - max) and max (b, 1): exp(x) = exp(x - max) * e^max without overflow."""
    m = x.amax(-1, keepdim=True)
    return (x - m).exp(), m


class _Kernel:
    """One stage's kernel over a batch: K = exp(Z) and its contiguous transpose (kernel domain) or Z itself
    (log domain), with Z_ij = (f_i + g_j - C_ij) / eps_stage - shifts, -inf on padding. Scalings u, v give
    the plan exp(u_i + Z_ij + v_j)."""

    def __init__(self, log: bool, Z=None, K=None, Kt=None):
        self.log, self.Z, self.K, self.Kt, self.K2 = log, Z, K, Kt, None

    @classmethod
    def build(cls, Z: torch.Tensor, log: bool) -> "_Kernel":
        if log:
            return cls(True, Z=Z)
        K = Z.exp_()  # (b, N, M) in [0, 1], exactly 0 on padding (Z is the caller's scratch)
        return cls(False, K=K, Kt=K.transpose(1, 2).contiguous())

    def narrow(self, sel: torch.Tensor) -> "_Kernel":
        """The kernel of some of the batch's sequences (no copy when sel keeps all of them, in order)."""
        n = len(self.Z if self.log else self.K)
        if len(sel) == n and bool((sel == torch.arange(n, device=sel.device)).all()):
            return self
        return _Kernel(True, Z=self.Z[sel]) if self.log else _Kernel(False, K=self.K[sel], Kt=self.Kt[sel])

    def row_update(self, v, rows: Marginal):
        """(b, M) -> (b, N): u_i = log a_i - log sum_j exp(Z_ij + v_j) (the plan's rows exact), 0 on padding."""
        if self.log:
            s = torch.logsumexp(self.Z + v[:, None, :], dim=2)
        else:
            ev, m = _exp_shifted(v)
            s = vecmat(ev, self.Kt).log() + m
        return torch.where(rows.ok, rows.log - s, 0.0)

    def col_update(self, u, cols: Marginal):
        """(b, N) -> (b, M): v_j = log b_j - log sum_i exp(u_i + Z_ij), 0 on padding."""
        if self.log:
            s = torch.logsumexp(self.Z + u[:, :, None], dim=1)
        else:
            eu, m = _exp_shifted(u)
            s = vecmat(eu, self.K).log() + m
        return torch.where(cols.ok, cols.log - s, 0.0)

    def plan(self, u, v):
        """(b, N, M) exp(u_i + Z_ij + v_j), 0 on padding."""
        if self.log:
            return (self.Z + u[:, :, None] + v[:, None, :]).exp()
        return u.exp()[:, :, None] * self.K * v.exp()[:, None, :]

    def operator(self, u, v) -> PlanOperator:
        """The plan as an operator for the dual system (the kernel domain never builds it). The squared kernel
        its preconditioner needs is made once per kernel, not once per Newton step."""
        if self.log:
            return PlanOperator.of(self.plan(u, v))
        if self.K2 is None:
            self.K2 = self.K.square() if self.K.shape[1] >= self.K.shape[2] else self.Kt.square()
        big_rows = self.K.shape[1] >= self.K.shape[2]
        return PlanOperator(
            self.K, self.Kt, u.exp(), v.exp(), K2=self.K2 if big_rows else None, K2t=None if big_rows else self.K2
        )


def _stage_kernel(Cs, f, g, e, a_ok, b_ok, log: bool):
    """The kernel of a stage at eps e (b,) from potentials f, g (units of C): Z = (f_i + g_j - Cs_ij) / e, each
    row's maximum shifted to 0 and each column's maximum below -ABSORB shifted to 0. The plan does not
    change (f, g absorb the shifts), so K = exp(Z) has an entry 1 in every valid row and none above, whatever
    eps and the potentials. Row shifts cost nothing: the first row update recomputes u from v alone, so a warm
    start keeps its quality; a column shift would not, hence only where the column would underflow.
    Returns the kernel and the shifts (b, N), (b, M) in units of C, to be added to f and g."""
    Z = (f[:, :, None] + g[:, None, :]).sub_(Cs).div_(e[:, None, None])  # (b, N, M), -inf on padding
    r = torch.where(a_ok, Z.amax(2), 0.0)  # (b, N); in place below: these are the largest tensors here
    c = Z.sub_(r[:, :, None]).amax(1)  # (b, M)
    c = torch.where(b_ok & (c < -ABSORB), c, 0.0)
    if bool((c != 0).any()):  # rare: skip a pass over Z otherwise
        Z.sub_(c[:, None, :])
    return _Kernel.build(Z, log), -r * e[:, None], -c * e[:, None]


def _iterate(kern, u, v, rows: Marginal, cols: Marginal, stop, limit, check_every, overrelax, absorb):
    """Sinkhorn on one stage's batch, each sequence until its error <= stop (b,), its iteration limit (b,), or
    its scalings need absorbing (|u|, |v| > absorb) or go non-finite.

    Returns u, v, iterations (b,), err (b,) of the returned (u, v).
    The error of the current plan is checked every `check_every` iterations (the only host synchronisation:
    on a GPU `.any()` waits for the device). Over-relaxation u <- u + omega (u_update - u), per sequence: from
    the second check on, each window's error decay gives the contraction rate of plain Sinkhorn (directly when
    omega = 1, through SOR's eigenvalue relation otherwise) and omega is raised towards Young's optimum, capped
    at OMEGA_MAX. If the error grows over a window, the sequence returns to its last checked state and the
    excess omega - 1 is halved (and capped below that value from then on).
    """
    nb = u.shape[0]
    out_u, out_v = u.clone(), v.clone()
    out_it = torch.zeros(nb, dtype=torch.long, device=u.device)
    out_err = u.new_full((nb,), math.inf)
    idx = torch.arange(nb, device=u.device)  # positions in the stage's batch still iterating
    a, b = rows.log.exp(), cols.log.exp()
    omega = u.new_ones(nb)
    cap = u.new_full((nb,), OMEGA_MAX)
    err_prev = u.new_full((nb,), math.inf)
    u_snap, v_snap = u, v
    live = torch.ones(nb, dtype=torch.bool, device=u.device)  # False: finished, frozen until the next compaction
    stops = set(limit.tolist())  # a sequence's iteration limit is also a check
    it, last_check = 0, 0
    while len(idx):
        u_new = kern.row_update(v, rows)  # (b, N)
        if it % check_every == 0 or it in stops:  # error of the plan (u, v): rows for free, columns cost one
            err = (a * torch.expm1(u - u_new).abs()).sum(-1) + (
                b * torch.expm1(v - kern.col_update(u, cols)).abs()
            ).sum(-1)  # (b,)
            if overrelax and it > last_check:
                ratio = err / err_prev  # (b,) error decay over the last window
                bad = (omega > 1) & ~(ratio <= 1)  # grew (or went non-finite): back to the last check
                cap = torch.where(bad, 1 + 0.75 * (omega - 1), cap)
                omega = torch.where(bad, 1 + 0.5 * (omega - 1), omega)
                u, v = torch.where(bad[:, None], u_snap, u), torch.where(bad[:, None], v_snap, v)
                err = torch.where(bad, err_prev, err)
                if bad.any():  # rare: recompute the row update from the restored state only then
                    u_new = torch.where(bad[:, None], kern.row_update(v, rows), u_new)
                lam = ratio.clamp(1e-30, 1.0) ** (1.0 / (it - last_check))  # observed per-iteration rate
                mu2 = (lam + omega - 1) ** 2 / (lam * omega**2)  # plain rate (= lam when omega = 1)
                target = torch.minimum(_young_omega(mu2), cap)
                raise_ = ~bad & (it >= 2 * check_every) & (ratio < 1) & (target > omega)
                omega = torch.where(raise_, target, omega)
            u_snap, v_snap, err_prev, last_check = u, v, err, it
            big = torch.maximum(u.abs().amax(-1), v.abs().amax(-1)) > absorb
            done = live & ((err <= stop[idx]) | (it >= limit[idx]) | big | ~torch.isfinite(err))
            if done.any():  # write the finished ones back; they stop changing
                d = idx[done]
                out_u[d], out_v[d], out_it[d], out_err[d] = u[done], v[done], it, err[done]
                live &= ~done
                if not live.any():
                    break
                # Dropping them from the working batch copies the kernel (2 x b x N x M): worth it only once at
                # least half the batch is done; until then the finished ones are computed and discarded.
                if 2 * int(live.sum()) <= len(live):
                    keep = live.nonzero()[:, 0]
                    idx, rows, cols, a, b = idx[keep], rows.select(keep), cols.select(keep), a[keep], b[keep]
                    u, v, u_new, omega, cap = u[keep], v[keep], u_new[keep], omega[keep], cap[keep]
                    u_snap, v_snap, err_prev = u_snap[keep], v_snap[keep], err_prev[keep]
                    kern, live = kern.narrow(keep), live[keep]
        w = torch.where(live, omega, 0.0)[:, None]  # a frozen sequence keeps its returned u, v
        u = u + w * (u_new - u)
        v = v + w * (kern.col_update(u, cols) - v)
        it += 1
    return out_u, out_v, out_it, out_err


def _newton(kern, u, v, err, rows: Marginal, cols: Marginal, tol, limit, absorb):
    """Newton steps on the dual of one stage's batch, each sequence until its error <= tol, its step limit
    (b,), or a step the line search cannot accept.

    With the row update applied (u = u(v), rows exact), the semi-dual F(v) = <b, v> + <a, u(v)> is concave in
    v with gradient b - T^T 1 and negative Hessian S = diag(T^T 1) - T^T diag(1 / a) T, the Schur complement
    of the system the implicit backward solves (`solve_dual_system`, CG). Newton: S dv = b - T^T 1. A step
    t in {1, 1/2, ...} is accepted when it raises F by a fraction of the predicted ascent (F's change summed
    in float64 from the changes of u and v, which float32 resolves far below F's own rounding) or lowers the
    error.
    Sequences with limit 0 or err <= tol are returned as given. Returns u, v, steps (b,), err (b,), stalled (b,).
    """
    a, b = rows.log.exp(), cols.log.exp()
    ao, bo = rows.ok, cols.ok

    def state(v):  # rows exact: u, T^T 1, error
        u = kern.row_update(v, rows)
        col = torch.where(bo, b * torch.exp(v - kern.col_update(u, cols)), 0.0)  # (b, M)
        return u, col, (col - b).abs().sum(-1)

    mine = ((limit > 0) & (err > tol))[:, None]  # (b, 1) the sequences this call works on
    u_in, v_in, err_in = u, v, err
    u, col, err = state(v)
    steps = torch.zeros_like(limit)
    stalled = torch.zeros_like(ao[:, 0])
    # The whole batch takes part in every step (a sequence that is done gets a zero right-hand side, which CG
    # leaves alone): narrowing the kernel to the active sequences would copy it, which costs more than the
    # products it saves.
    for _ in range(NEWTON_MAX_STEPS):
        act = (err > tol) & ~stalled & (steps < limit) & torch.isfinite(err)  # (b,)
        if not act.any():
            break
        grad = torch.where(act[:, None] & bo, b - col, 0.0)  # (b, M) gradient of F, 0 for the inactive
        _, dv, _, _ = solve_dual_system(
            kern.operator(u, v), torch.zeros_like(u), grad, ao, bo, NEWTON_CG_TOL, NEWTON_CG_MAX_ITER
        )
        dv = torch.where(act[:, None], dv, 0.0)
        slope = (grad * dv).sum(-1)  # (b,) predicted ascent of F per unit step, > 0
        # a column with far too little mass asks for a log-step of (b - c) / c, far beyond the log(b / c) it
        # needs: cap every step at NEWTON_MAX_STEP in the scalings (a trust region; damped Newton still converges)
        t = (NEWTON_MAX_STEP / dv.abs().amax(-1).clamp_min(1e-30)).clamp(max=1.0)  # (b,)
        accepted = torch.zeros_like(act)
        for _ in range(LINE_SEARCH_STEPS):
            v_t = torch.where(bo, v + t[:, None] * dv, 0.0)
            u_t, col_t, err_t = state(v_t)
            dF = (b * (v_t - v)).sum(-1, dtype=torch.float64) + (a * (u_t - u)).sum(-1, dtype=torch.float64)  # (b,)
            inside = torch.maximum(u_t.abs().amax(-1), v_t.abs().amax(-1)) <= absorb  # else: absorb, rebuild K
            ok = act & ~accepted & torch.isfinite(err_t) & inside & ((dF >= 1e-4 * t * slope) | (err_t < err))
            u, v = torch.where(ok[:, None], u_t, u), torch.where(ok[:, None], v_t, v)
            col, err = torch.where(ok[:, None], col_t, col), torch.where(ok, err_t, err)
            accepted |= ok
            if (accepted | ~act).all():
                break
            t = torch.where(accepted, t, t / 2)
        stalled |= act & ~accepted
        steps += act.long()
    return (
        torch.where(mine, u, u_in),
        torch.where(mine, v, v_in),
        steps,
        torch.where(mine[:, 0], err, err_in),
        stalled,
    )


def _finish(kern, u, v, err, rows: Marginal, cols: Marginal, tol, limit, check_every, overrelax, absorb):
    """A stage after Sinkhorn reached NEWTON_START, to tol (b,): Newton; a sequence whose Newton step stalls runs
    check_every Sinkhorn iterations and Newton tries again, NEWTON_ROUNDS times at most, then Sinkhorn (which
    converges from anywhere, slowly) up to its limit (b,; 0 = leave this sequence alone). A sequence whose
    scalings leave [-absorb, absorb] returns early so that its stage folds them into a rebuilt kernel. The whole
    batch's kernel is used throughout: narrowing it to the pending sequences would copy it.
    Returns u, v, err, iterations + steps spent (b,)."""
    spent = torch.zeros_like(limit)

    def pending():  # (b,) bool
        big = torch.maximum(u.abs().amax(-1), v.abs().amax(-1)) > absorb
        return (err > tol) & torch.isfinite(err) & ~big & (spent < limit)

    def sinkhorn_for(todo, n):  # plain iterations for the sequences todo, at most n each; the others untouched
        nonlocal u, v, err
        u_i, v_i, it, err_i = _iterate(
            kern, u, v, rows, cols, tol, torch.where(todo, n, 0), check_every, overrelax, absorb
        )
        u, v = torch.where(todo[:, None], u_i, u), torch.where(todo[:, None], v_i, v)
        err = torch.where(todo, err_i, err)
        return it

    for _ in range(NEWTON_ROUNDS):
        todo = pending()
        if not todo.any():
            return u, v, err, spent
        u, v, steps, err, stalled = _newton(
            kern, u, v, err, rows, cols, tol, torch.where(todo, limit - spent, 0), absorb
        )
        spent += steps
        todo = pending() & stalled
        if todo.any():
            spent += sinkhorn_for(todo, (limit - spent).clamp(max=check_every))
    todo = pending()
    if todo.any():
        spent += sinkhorn_for(todo, limit - spent)
    return u, v, err, spent


@torch.no_grad()
def sinkhorn(
    C: torch.Tensor,
    a_mask: torch.Tensor,
    b_mask: torch.Tensor,
    eps,
    tol: float | None = None,
    max_iter: int = 1000,
    *,
    eps_scaling: bool = True,
    newton: bool = True,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    domain: str = "kernel",
    check_every: int = 10,
    overrelax: bool = True,
) -> SinkhornResult:
    """Entropic OT between uniform marginals over the valid tokens, batched.

    C: (B, N, M) cost (any finite values; entries on padding are ignored, they may be garbage).
    a_mask: (B, N) bool, b_mask: (B, M) bool, True on real tokens (other dtypes: TypeError). N != M and
         N_valid != M_valid are fine.
    eps: entropic regularisation (1/lambda in the form <T, C> - (1/lambda) H(T)), > 0 (else ValueError): a float,
         or a (B,) tensor with one value per sequence (relative eps, see `ot_loss`).
    tol: a sequence stops once the L1 marginal error (rows + columns) of its plan is <= tol; default
         `default_tol(C.dtype)`.
    max_iter: cap on Sinkhorn iterations + Newton steps per sequence, over all eps stages; `converged` says who
         reached tol.
    eps_scaling: solve a sequence of eps stages from spread(C) / EPS_START_DIVISOR down to eps (see the top of
         this file); False solves at eps directly (as does a warm start).
    newton: finish the last stage with Newton steps on the dual once the error is below NEWTON_START.
    init: warm start (f, g), (B, N) and (B, M) potentials in units of C, e.g. an earlier result's f and g.
    domain: "kernel" (matrix-vector products with the absorbed kernel; a sequence that goes non-finite redoes
         its stage in the log domain) or "log" (a logsumexp per element: slower, for checking). Both iterate
         the same scaled log-potentials, so they agree to rounding.
    check_every: iterations between convergence checks.
    overrelax: adaptive over-relaxation of the Sinkhorn iterations (see `_iterate`).
    """
    B, N, M = C.shape
    check_mask(a_mask, "a_mask")  # an integer mask would turn ~ into -1/-2 and & into bitwise garbage
    check_mask(b_mask, "b_mask")
    eps = eps_vector(eps, B, C)  # (B,)
    tol = default_tol(C.dtype) if tol is None else tol
    if domain not in ("kernel", "log"):
        raise ValueError(f"domain must be 'kernel' or 'log', got {domain!r}")
    a_ok, b_ok = valid_masks(a_mask, b_mask)
    log_a = _uniform(a_ok, C.dtype).log()  # (B, N), -inf on padding (only ever used through where)
    log_b = _uniform(b_ok, C.dtype).log()  # (B, M)
    pair = a_ok[:, :, None] & b_ok[:, None, :]  # (B, N, M)
    # +inf cost on padding makes every kernel entry exactly 0 there, so padding never takes mass
    Cs = torch.where(pair, C, math.inf)  # (B, N, M)
    # Subtracting a constant per row (then per column) from C leaves the plan unchanged (f, g absorb it) but
    # shrinks |C/eps| from max(C)/eps to about the spread of C over eps, which keeps float32 accurate: the
    # potentials' rounding, ~6e-8 * |C/eps|, sets the floor of the marginal error. In place: one (B, N, M).
    c_row = torch.where(a_ok, Cs.amin(2), 0.0)  # (B, N)
    c_col = torch.where(b_ok, Cs.sub_(c_row[:, :, None]).amin(1), 0.0)  # (B, M)
    Cs.sub_(c_col[:, None, :])  # (B, N, M) >= 0 on valid pairs, inf on padding

    f, g = C.new_zeros(B, N), C.new_zeros(B, M)  # potentials so far, in units of C (shifted)
    if init is not None:
        f = torch.where(a_ok, init[0].to(C.dtype) - c_row, 0.0)
        g = torch.where(b_ok, init[1].to(C.dtype) - c_col, 0.0)
    eps0 = eps  # (B,) the first stage's eps
    if eps_scaling and init is None:
        spread = torch.where(pair, Cs, 0.0).amax((1, 2))  # (B,)
        eps0 = torch.maximum(eps, spread / EPS_START_DIVISOR)
    converged = ~a_ok.any(-1)  # empty problems are done before they start
    st = SolverState(
        f=f,
        g=g,
        eps=eps,
        eps0=eps0,
        stage=torch.zeros(B, dtype=torch.long, device=C.device),
        n_iters=torch.zeros(B, dtype=torch.long, device=C.device),
        converged=converged,
        finished=converged.clone(),
        log_domain=torch.full((B,), domain == "log", device=C.device),
        plan=torch.zeros_like(Cs),
        err=C.new_zeros(B),
    )
    opts = StageOptions(tol, max_iter, newton, check_every, overrelax)
    rows, cols = Marginal(log_a, a_ok), Marginal(log_b, b_ok)
    while not st.finished.all():
        for log in (False, True):  # the kernel-domain sequences, then any that need the log domain
            idx = (~st.finished & (st.log_domain == log)).nonzero()[:, 0]  # (b,)
            if len(idx):
                _stage(Cs, st, idx, rows.select(idx), cols.select(idx), opts, log)
    return SinkhornResult(
        st.plan,
        torch.where(a_ok, st.f + c_row, 0.0),
        torch.where(b_ok, st.g + c_col, 0.0),
        st.n_iters,
        st.err,
        st.converged,
    )


def _stage(Cs, st: SolverState, idx, rows: Marginal, cols: Marginal, opts: StageOptions, log: bool):
    """One eps stage for the sequences idx (b,) (their marginals `rows`, `cols`), updating their rows of `st` in
    place: Sinkhorn until NEWTON_START (or NEWTON_AFTER iterations), then Newton to the stage's tolerance (tol in
    the last stage, STAGE_TOL before it); without Newton, Sinkhorn to the stage's tolerance."""
    tol, max_iter, check_every, overrelax = opts.tol, opts.max_iter, opts.check_every, opts.overrelax
    e = torch.maximum(st.eps[idx], st.eps0[idx] * EPS_DECAY ** st.stage[idx].to(Cs.dtype))  # (b,) this stage's eps
    final = e <= st.eps[idx]
    stage_tol = torch.where(final, tol, max(STAGE_TOL, tol))  # (b,)
    kern, df, dg = _stage_kernel(Cs[idx], st.f[idx], st.g[idx], e, rows.ok, cols.ok, log)
    st.f[idx], st.g[idx] = st.f[idx] + df, st.g[idx] + dg
    absorb = math.inf if log else ABSORB
    v = Cs.new_zeros(len(idx), Cs.shape[2])
    u = kern.row_update(v, rows)  # undoes the kernel's row shifts: the stage starts from its potentials' plan
    limit = max_iter - st.n_iters[idx]
    if opts.newton:
        stop = torch.maximum(stage_tol, torch.full_like(stage_tol, NEWTON_START))
        u, v, it, err = _iterate(
            kern, u, v, rows, cols, stop, limit.clamp(max=NEWTON_AFTER), check_every, overrelax, absorb
        )
    else:
        u, v, it, err = _iterate(kern, u, v, rows, cols, stage_tol, limit, check_every, overrelax, absorb)
    st.n_iters[idx] += it
    big = torch.maximum(u.abs().amax(-1), v.abs().amax(-1)) > absorb
    if opts.newton:
        fin = ~big & torch.isfinite(err) & (err > stage_tol)  # (b,)
        if fin.any():
            u, v, err, spent = _finish(
                kern,
                u,
                v,
                err,
                rows,
                cols,
                stage_tol,
                torch.where(fin, limit - it, 0),
                check_every,
                overrelax,
                absorb,
            )
            st.n_iters[idx] += spent
    big = torch.maximum(u.abs().amax(-1), v.abs().amax(-1)) > absorb  # these fold u, v in and redo their eps
    bad = ~torch.isfinite(err)
    capped = st.n_iters[idx] >= max_iter
    out = final & ~big & ~bad | capped & ~bad | bad & log  # in the log domain a breakdown is final
    ok = out & final & (err <= tol) & ~bad
    if out.any():  # the plan from the stage's own kernel: consistent with the scalings it converged for
        o = out.nonzero()[:, 0]
        p = kern.narrow(o).plan(u[o], v[o])  # (o, N, M)
        # The returned plan is the truth: one that overflowed (non-finite) is redone in the log domain, and
        # "converged" needs the plan's own marginal error within 2 x tol (rebuilding it from the scalings
        # rounds a little differently from the solver's own check).
        row_sum, col_sum = p.sum(2), p.sum(1)  # (o, N), (o, M)
        finite = torch.isfinite(row_sum.sum(-1))  # (o,) any inf/NaN entry makes its row sum non-finite
        if not finite.all():
            p = torch.where(finite[:, None, None], p, 0.0)
            row_sum, col_sum = p.sum(2), p.sum(1)
        p_err = (row_sum - rows.log[o].exp().masked_fill(~rows.ok[o], 0.0)).abs().sum(-1) + (
            col_sum - cols.log[o].exp().masked_fill(~cols.ok[o], 0.0)
        ).abs().sum(-1)  # (o,)
        ok[o] &= finite & (p_err <= 2 * tol)
        if not log:
            redo = ~finite & ~capped[o]
            bad[o] |= redo
            out[o] &= ~redo
        st.plan[idx[o]], st.err[idx[o]] = p, p_err
    if bad.any() and not log:  # the kernel iteration broke down: this stage again, in the log domain
        st.log_domain[idx[bad & ~out]] = True
    good = ~bad[:, None]
    st.f[idx] = torch.where(rows.ok & good, st.f[idx] + e[:, None] * u, st.f[idx])
    st.g[idx] = torch.where(cols.ok & good, st.g[idx] + e[:, None] * v, st.g[idx])
    # an intermediate stage only hands over a start, reached or not; absorbed-only sequences redo their eps
    st.stage[idx] += (~final & ~big & ~bad).long()
    st.converged[idx] = ok
    st.finished[idx] = out

"""Sequence-level entropic OT losses: between student and (projected) teacher hidden states, and between
student and teacher next-token distributions (plain full-logits version; Stage 2 uses
`pipeline/losses/fused_ot.py`, which never builds the logits).

Pure functions of tensors; masks are explicit bool tensors (True = counts; other dtypes are refused).
Imports only torch.
"""

import math
from dataclasses import dataclass

import torch

from pipeline.losses.checks import check_mask, check_positive
from pipeline.losses.implicit import ot_loss
from pipeline.losses.kl import upcast
from pipeline.losses.sinkhorn import SinkhornResult

# Default entropic regularisation for the OT losses; see `ot_hidden_loss` for why not eps = 10 (lambda = 0.1 in the
# <T, C> - (1/lambda) H(T) form).
OT_EPS = 0.05


def cost_from_similarity(S: torch.Tensor, y_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """C = 1 - softmax_j(S_ij / temperature) over the valid teacher tokens j: (B, N, M) -> (B, N, M) in [0, 1].

    A similarity bounded in [0, 1] (the logits one) spreads a row's softmax over at most e^1 : 1, so C stays near
    1 - 1/M; a temperature below 1 lets the row concentrate on the teacher tokens it resembles most."""
    S = upcast(S) / temperature
    S = S.masked_fill(~y_mask[:, None, :], float("-inf"))
    # A sequence with no valid teacher token would softmax over all -inf (NaN); it is an empty OT problem,
    # so give it any finite row (its plan is all zero and its gradient is zero).
    S = torch.where(y_mask.any(-1)[:, None, None], S, 0.0)
    return 1.0 - S.softmax(-1)


def cost_spread(C: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    """(B,) std(C) / mean(C) over each sequence's valid entries (population std; 0 for an empty problem).

    How much the cost varies relative to its level: a row-softmax cost over M columns sits at 1 - 1/M everywhere
    until the similarity is sharp, and then every plan is nearly the uniform one and the loss's gradient says little
    about the alignment. Logged per OT term (ot_cost_spread_*) so a flat cost is visible. Masked sums are mask-vector
    products (no masked copy of C) and the variance is taken about the mean, not as E[C^2] - mean^2 (which float32
    cannot resolve for a flat cost): one (B, N, M) temporary."""
    with torch.no_grad():
        xm, ym = x_mask.to(C.dtype)[:, None, :], y_mask.to(C.dtype)[:, :, None]  # (B, 1, N), (B, M, 1)
        n = (xm.sum((1, 2)) * ym.sum((1, 2))).clamp_min(1)  # (B,) valid entries
        mean = (xm @ (C @ ym)).view(-1) / n  # (B,)
        d = (C - mean[:, None, None]).square_()  # (B, N, M), the one temporary
        var = (xm @ (d @ ym)).view(-1) / n
        spread = var.clamp_min(0).sqrt() / mean.clamp_min(torch.finfo(C.dtype).tiny)
        return torch.where(x_mask.any(-1) & y_mask.any(-1), spread, 0.0).float()


def reduce_sequences(per_seq: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, reduction: str):
    if reduction == "sum":
        return per_seq.sum()
    if reduction == "mean":  # over sequences that have a valid token on both sides
        n = (x_mask.any(-1) & y_mask.any(-1)).sum().clamp_min(1)
        return per_seq.sum() / n
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


OBJECTIVES = ("linear", "regularized")
EPS_SCALES = ("absolute", "std")


@dataclass(frozen=True, slots=True)
class OTSolver:
    """How every sequence-level OT loss solves and differentiates its transport problems, as one value (Stage 2
    builds it once from `distill.ot`; the config validates the same rules with the parameters' names).

    eps: entropic regularisation, > 0 (absolute, or x each sequence's std(C) with eps_scale="std", see
        `implicit.relative_eps`). objective: "linear" = <T*, C> with its exact implicit gradient, "regularized" =
        <T*, C> - eps H(T*) with the envelope gradient T*. tol: the L1 marginal error at which Sinkhorn stops
        (None: `sinkhorn.default_tol` of the cost's dtype). max_iter: Sinkhorn iterations + Newton steps per sequence.
    """

    eps: float = OT_EPS
    objective: str = "linear"
    eps_scale: str = "absolute"
    tol: float | None = None
    max_iter: int = 1000

    def __post_init__(self):
        check_positive(self.eps, "eps")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.eps_scale not in EPS_SCALES:
            raise ValueError(f"eps_scale must be one of {EPS_SCALES}, got {self.eps_scale!r}")
        if self.tol is not None:
            check_positive(self.tol, "tol")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an int >= 1, got {self.max_iter!r}")

    def loss(self, C: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor):
        """Per-sequence OT loss (B,) of cost C (B, N, M) between the valid tokens, and the SinkhornResult."""
        return ot_loss(
            C, x_mask, y_mask, self.eps, self.objective, eps_scale=self.eps_scale, tol=self.tol, max_iter=self.max_iter
        )


def check_masks(x_mask: torch.Tensor, y_mask: torch.Tensor) -> None:
    """The masks every OT loss would otherwise turn into a wrong value or NaN (see pipeline/losses/checks.py)."""
    check_mask(x_mask, "x_mask")
    check_mask(y_mask, "y_mask")


def teacher_topk(
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    y_mask: torch.Tensor,
    V: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher ids (B, M, k) long and probabilities (B, M, k) in `dtype` made safe to gather with, the same in the
    plain and the fused logits OT: padding rows may hold anything (ids -1 or >= V, log-probs -inf or NaN), so
    they get id 0 and probability 0 (a padding column is masked out of C anyway). On a real row an id outside
    [0, V) cannot be a token of the student's vocabulary: refused, not silently read as another token.
    """
    ids = teacher_ids.long()
    inside = (ids >= 0) & (ids < V)  # (B, M, k)
    if not inside[y_mask].all():
        bad = ids[y_mask][~inside[y_mask]]
        raise ValueError(
            f"teacher_ids on unmasked rows must lie in [0, {V}) (the student's vocabulary), got {bad[0].item()}"
        )
    ids = torch.where(y_mask[..., None], ids, 0)
    p = torch.where(y_mask[..., None], teacher_logprobs.to(dtype).exp(), 0.0)
    return ids, p


def init_projection(
    D: int, d: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(D, d) teacher -> student projection, N(0, 1/D).

    Each coordinate of Y P then has variance sum_D Var(Y) / D = Var(Y): unit-variance teacher hidden states
    (after the model's final norm) give unit-variance projected ones, so S = X (Y P)^T / sqrt(d) starts at
    the same scale as attention logits.
    """
    return torch.randn(D, d, generator=generator, dtype=dtype) / math.sqrt(D)


def ot_hidden_loss(
    x: torch.Tensor,
    x_mask: torch.Tensor,
    y: torch.Tensor,
    y_mask: torch.Tensor,
    proj: torch.Tensor,
    *,
    solver: OTSolver = OTSolver(),
    reduction: str = "mean",
) -> tuple[torch.Tensor, SinkhornResult]:
    """Entropic OT between student and (projected) teacher hidden states of one sequence, batched.

    x: (B, N, d) student hidden states, x_mask (B, N); y: (B, M, D) teacher hidden states, y_mask (B, M);
    proj: (D, d) learned projection (`init_projection`).
        S = X (Y P)^T / sqrt(d)                     (B, N, M)
        C = 1 - softmax_j(S)   over valid j         (B, N, M), in [0, 1]
        loss_b = <T*, C>   T* = entropic OT plan between uniform marginals over the valid tokens
    Gradients reach x and proj (and y if it requires grad) through C: autograd through the softmax, the OT
    step supplies the exact implicit dL/dC (solver.objective="linear") or T* ("regularized", which
    optimises <T*, C> - eps H(T*) instead; see pipeline/losses/sinkhorn.py).

    solver.eps: the entropic problem min <T, C> - eps H(T) is also written with 1/lambda for eps, so eps = 1/lambda
        and lambda = 0.1 would be eps = 10: with C in [0, 1] the plan would be ~exp(-C/10) ~ uniform, so the
        loss would only see mean(C) and no alignment at all. Default 0.05 (OTT-JAX's relative default is
        0.05 * std(C)); note that C's spread shrinks like 1/M for soft similarities, so a fixed eps is relatively
        looser on long sequences.
        eps_scale="std" makes eps relative to each sequence's std(C) instead (see `relative_eps`).
    reduction: "mean" over sequences with at least one valid token on each side, or "sum". Sequences with
        none contribute 0.
    Returns (loss scalar, SinkhornResult) - the result's n_iters / err are for logging.
    """
    check_masks(x_mask, y_mask)
    # Padding rows are zeroed with where, not a multiplication: 0 * NaN = NaN, and a NaN row of S would reach
    # proj's gradient through the softmax backward (its upstream gradient is 0, but 0 * NaN is NaN again).
    x = torch.where(x_mask[..., None], x, 0.0)
    y = torch.where(y_mask[..., None], y, 0.0)
    S = x @ (y @ proj).transpose(1, 2) / math.sqrt(x.shape[-1])  # (B, N, M)
    C = cost_from_similarity(S, y_mask)
    per_seq, res = solver.loss(C, x_mask, y_mask)  # (B,)
    res = res._replace(cost_spread=cost_spread(C, x_mask, y_mask))
    return reduce_sequences(per_seq, x_mask, y_mask, reduction), res


class _TopkSimilarity(torch.autograd.Function):
    """S_ij = sum_c q[i, ids[j, c]] * p[j, c], blockwise over teacher tokens j.

    q: (B, N, V) student probs, ids: (B, M, k), p: (B, M, k) teacher probs (constant). At most
    B x block x N x k gathered elements exist at once, in forward and backward: autograd would instead save
    every block's (B, N, block, k) gather for the backward, i.e. all B x N x M x k of them. The backward needs
    no q (S is linear in q), only ids and p.
    """

    @staticmethod
    def forward(ctx, q, ids, p, block):
        B, N, _ = q.shape
        M, k = ids.shape[1:]
        S = q.new_empty(B, N, M)
        for j0 in range(0, M, block):
            idx = ids[:, j0 : j0 + block].reshape(B, 1, -1).expand(B, N, -1)  # (B, N, Mb*k)
            qg = q.gather(2, idx).view(B, N, -1, k)  # (B, N, Mb, k)
            S[:, :, j0 : j0 + block] = (qg * p[:, None, j0 : j0 + block]).sum(-1)  # (B, N, Mb)
        ctx.save_for_backward(ids, p)
        ctx.block, ctx.q_shape = block, q.shape
        return S

    @staticmethod
    def backward(ctx, dS):  # (B, N, M)
        ids, p = ctx.saved_tensors
        B, N, _ = ctx.q_shape
        dq = dS.new_zeros(ctx.q_shape)
        for j0 in range(0, ids.shape[1], ctx.block):
            idx = ids[:, j0 : j0 + ctx.block].reshape(B, 1, -1).expand(B, N, -1)  # (B, N, Mb*k)
            contrib = dS[:, :, j0 : j0 + ctx.block, None] * p[:, None, j0 : j0 + ctx.block]  # (B, N, Mb, k)
            dq.scatter_add_(2, idx, contrib.reshape(B, N, -1))
        return dq, None, None, None


def ot_logits_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    x_mask: torch.Tensor,
    y_mask: torch.Tensor,
    *,
    solver: OTSolver = OTSolver(),
    block: int = 64,
    vocab_size: int | None = None,
    reduction: str = "mean",
    score_temperature: float = 1.0,
) -> tuple[torch.Tensor, SinkhornResult]:
    """Entropic OT between student and teacher next-token distributions of one sequence, batched.

    student_logits: (B, N, V) raw logits (first vocab_size columns real); teacher_ids (B, M, k) long and
    teacher_logprobs (B, M, k) from the cache; x_mask (B, N), y_mask (B, M).
        q_i = softmax(student_logits_i)                        (B, N, V)
        S_ij = sum_{v in topk(j)} q_i(v) p_j(v)                (B, N, M)
        C = 1 - softmax_j(S / score_temperature), T* and the loss as in `ot_hidden_loss`.
    Scaling: S uses probabilities on both sides, so S_ij is the probability that student position i and
    teacher position j emit the same token (restricted to the teacher's top-k; the teacher tail is ignored):
    bounded in [0, 1], 1 only for identical one-hot predictions, independent of V and k. Products of
    log-probs would instead be unbounded (k * log(V)^2 scale) and largest for the *least* confident pairs,
    which is not a similarity. Consequence: at score_temperature 1 the row softmax sees differences of at most 1,
    so C sits near 1 - 1/M (measured: std(C)/mean(C) ~1e-4 at the start); a score_temperature of 0.05 turns
    those differences into up to 20 nats, and a row of C then separates the teacher tokens it matches.
    block: teacher tokens per block of the gather (memory: B x block x N x k, see _TopkSimilarity).
    Returns (loss scalar, SinkhornResult).
    """
    check_masks(x_mask, y_mask)
    z = upcast(student_logits[..., :vocab_size])  # (B, N, V)
    # padding rows zeroed (where, not *: 0 * NaN = NaN), as ot_hidden_loss does with its hidden states
    q = torch.where(x_mask[..., None], z, 0.0).softmax(-1)  # (B, N, V)
    ids, p = teacher_topk(teacher_ids, teacher_logprobs, y_mask, z.shape[-1], q.dtype)  # (B, M, k) each
    S = _TopkSimilarity.apply(q, ids, p, block)  # (B, N, M)
    C = cost_from_similarity(S, y_mask, score_temperature)
    per_seq, res = solver.loss(C, x_mask, y_mask)  # (B,)
    res = res._replace(cost_spread=cost_spread(C, x_mask, y_mask))
    return reduce_sequences(per_seq, x_mask, y_mask, reduction), res

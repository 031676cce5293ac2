"""Distillation losses: hard-label CE, KL on the teacher's cached top-k (+ tail bucket), and sequence-level
entropic OT on hidden states and on logits.

All are pure functions of tensors; masks are explicit bool tensors (True = counts). Every loss returns 0 with
zero gradients when nothing is supervised, never NaN. Imports only torch.
"""
import math

import torch
import torch.nn.functional as F

from pipeline.sinkhorn import SinkhornResult, ot_loss

# Teacher log-probs are floored here before use. Same value as the cache's tail floor (pipeline/topk.py):
# exp(-80) ~ 1.8e-35 is "no mass" at float32 precision, and a finite floor keeps p (log p - log q) at 0
# instead of 0 * (-inf) = NaN when the cache holds -inf.
LOG_FLOOR = -80.0

# Default entropic regularisation for the OT losses; see `ot_hidden_loss` for why not the seeds' lambda.
OT_EPS = 0.05


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # log-softmax / logsumexp must not run in half precision
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy on hard labels
# ---------------------------------------------------------------------------------------------------------

def ce_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, *,
            vocab_size: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy; logits[:, t] predicts labels[:, t + 1] (the shift happens here).

    logits: (B, L, V), labels: (B, L) long with -100 = ignore.
    num_items_in_batch: supervised-token count over all gradient-accumulation micro-batches (what
        transformers.Trainer passes), so that summing micro-batch losses gives the true token mean; default:
        this batch's supervised count.
    vocab_size: use only the first vocab_size logit columns (the rest are padding, not tokens).
    Returns a scalar: sum of token NLL / count (0 with zero gradient if nothing is supervised).
    """
    logits = _upcast(logits[:, :-1, :vocab_size])  # (B, L-1, V)
    labels = labels[:, 1:]  # (B, L-1)
    # reduction="sum" with every label ignored gives exactly 0 and zero gradients (a "mean" would be 0/0)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    n = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return nll / torch.as_tensor(n, device=nll.device).clamp_min(1).to(nll.dtype)


# ---------------------------------------------------------------------------------------------------------
# KL on the cached top-k + tail bucket
# ---------------------------------------------------------------------------------------------------------

def topk_kl_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 teacher_tail: torch.Tensor | None, mask: torch.Tensor, *, temperature: float = 1.0,
                 tail: str = "bucket", reverse: bool = False, vocab_size: int | None = None,
                 num_items=None) -> torch.Tensor:
    """KL between teacher and student on the teacher's top-k tokens plus one bucket for everything else.

    Row r of the student and row r of the teacher predict the same next token (the caller aligns them).
    student_logits: (R, V) raw logits; only the first vocab_size columns are real tokens.
    teacher_ids: (R, k) long, teacher_logprobs: (R, k) log-probs normalised over the full vocabulary,
    teacher_tail: (R,) log(1 - sum exp(teacher_logprobs)) (may be ~-80; unused when tail="none").
    mask: (R,) bool, rows that count. Leading dims other than R work too, e.g. (B, L, V) with mask (B, L).

    tail="bucket": the k+1 buckets [top-k tokens, everything else] on both sides; the student's tail is
        log(sum of its non-top-k probabilities), computed as a logsumexp over those logits, so it stays exact
        when its top-k hold ~all the mass. Without the tail the truncated KL is not a divergence and can go
        negative. If k covers the whole vocabulary there is no tail and "bucket" falls back to "none".
    tail="none": teacher renormalised over its top-k, student renormalised over the same k ids (DistillKit's
        "zero" missing-mass mode).
    reverse: KL(student || teacher) over the same buckets instead of KL(teacher || student).
    temperature tau: student logits / tau (full softmax, then bucketed); teacher bucket log-probs / tau,
        renormalised over the buckets (as DistillKit / Axolotl do with cached top-k). This is an
        approximation: the true tempered teacher softmax(z / tau) needs the teacher's full logits, and
        tempering the tail bucket as if it were one token over-weights it for tau > 1. Loss is scaled by tau^2
        so gradient magnitudes do not shrink with tau (Hinton et al.).
    Returns sum over masked rows / (num_items or the number of masked rows); 0 with zero gradients if none.
    """
    if tail not in ("bucket", "none"):
        raise ValueError(f"tail must be 'bucket' or 'none', got {tail!r}")
    if tail == "bucket" and teacher_tail is None:
        raise ValueError("tail='bucket' needs teacher_tail")
    # Only the supervised rows are computed; the others get exactly zero gradient from the indexing.
    z = _upcast(student_logits[..., :vocab_size][mask]) / temperature  # (R', V)
    ids = teacher_ids[mask].long()  # (R', k)
    t = teacher_logprobs[mask].to(z.dtype)  # (R', k)
    V, k = z.shape[-1], ids.shape[-1]

    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (R', 1)
    s = z.gather(-1, ids) - lse  # (R', k) student log-probs at the teacher's top-k
    if tail == "bucket" and k < V:
        # Student tail = logsumexp of the logits outside the top-k. A finite fill (not -inf) keeps the
        # logsumexp backward free of exp(-inf - -inf) = NaN.
        rest = z.scatter(-1, ids, torch.finfo(z.dtype).min)  # (R', V)
        s = torch.cat([s, torch.logsumexp(rest, dim=-1, keepdim=True) - lse], dim=-1)  # (R', k+1)
        t = torch.cat([t, teacher_tail[mask].to(z.dtype)[:, None]], dim=-1)  # (R', k+1)
    else:
        s = s.log_softmax(-1)  # renormalise over the k ids
    t = (t.clamp_min(LOG_FLOOR) / temperature).log_softmax(-1)  # (R', k+1) or (R', k)

    if reverse:
        kl = (s.exp() * (s - t)).sum(-1)  # (R',) KL(student || teacher)
    else:
        kl = (t.exp() * (t - s)).sum(-1)  # (R',) KL(teacher || student)
    n = mask.sum() if num_items is None else num_items
    n = torch.as_tensor(n, device=kl.device).clamp_min(1).to(kl.dtype)
    return kl.sum() * temperature ** 2 / n


# ---------------------------------------------------------------------------------------------------------
# Sequence-level OT
# ---------------------------------------------------------------------------------------------------------

def cost_from_similarity(S: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    """C = 1 - softmax_j(S_ij) over the valid teacher tokens j: (B, N, M) -> (B, N, M) in [0, 1]."""
    S = _upcast(S).masked_fill(~y_mask[:, None, :], float("-inf"))
    # A sequence with no valid teacher token would softmax over all -inf (NaN); it is an empty OT problem,
    # so give it any finite row (its plan is all zero and its gradient is zero).
    S = torch.where(y_mask.any(-1)[:, None, None], S, 0.0)
    return 1.0 - S.softmax(-1)


def reduce_sequences(per_seq: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, reduction: str):
    if reduction == "sum":
        return per_seq.sum()
    if reduction == "mean":  # over sequences that have a valid token on both sides
        n = (x_mask.any(-1) & y_mask.any(-1)).sum().clamp_min(1)
        return per_seq.sum() / n
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def init_projection(D: int, d: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(D, d) teacher -> student projection, N(0, 1/D).

    Each coordinate of Y P then has variance sum_D Var(Y) / D = Var(Y): unit-variance teacher hidden states
    (after the model's final norm) give unit-variance projected ones, so S = X (Y P)^T / sqrt(d) starts at
    the same scale as attention logits.
    """
    return torch.randn(D, d, generator=generator, dtype=dtype) / math.sqrt(D)


def ot_hidden_loss(x: torch.Tensor, x_mask: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor,
                   proj: torch.Tensor, *, eps: float = OT_EPS, objective: str = "linear",
                   reduction: str = "mean", tol: float | None = None,
                   max_iter: int = 1000) -> tuple[torch.Tensor, SinkhornResult]:
    """Entropic OT between student and (projected) teacher hidden states of one sequence, batched.

    x: (B, N, d) student hidden states, x_mask (B, N); y: (B, M, D) teacher hidden states, y_mask (B, M);
    proj: (D, d) learned projection (`init_projection`).
        S = X (Y P)^T / sqrt(d)                     (B, N, M)
        C = 1 - softmax_j(S)   over valid j         (B, N, M), in [0, 1]
        loss_b = <T*, C>   T* = entropic OT plan between uniform marginals over the valid tokens
    Gradients reach x and proj (and y if it requires grad) through C: autograd through the softmax, the OT
    step supplies the exact implicit dL/dC (objective="linear") or T* (objective="regularized", which
    optimises <T*, C> - eps H(T*) instead; see pipeline/sinkhorn.py).

    eps: the seeds write <T, C> - (1/lambda) H(T), so eps = 1/lambda. Their "lambda = 0.1" would be eps = 10:
        with C in [0, 1] the plan would be ~exp(-C/10) ~ uniform, so the loss would only see mean(C) and no
        alignment at all. Default 0.05 (OTT-JAX's relative default is 0.05 * std(C)); note that C's spread
        shrinks like 1/M for soft similarities, so a fixed eps is relatively looser on long sequences.
    reduction: "mean" over sequences with at least one valid token on each side, or "sum". Sequences with
        none contribute 0.
    Returns (loss scalar, SinkhornResult) - the result's n_iters / err are for logging.
    """
    S = x @ (y @ proj).transpose(1, 2) / math.sqrt(x.shape[-1])  # (B, N, M)
    C = cost_from_similarity(S, y_mask)
    per_seq, res = ot_loss(C, x_mask, y_mask, eps, objective, tol=tol, max_iter=max_iter)  # (B,)
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
            idx = ids[:, j0:j0 + block].reshape(B, 1, -1).expand(B, N, -1)  # (B, N, Mb*k)
            qg = q.gather(2, idx).view(B, N, -1, k)  # (B, N, Mb, k)
            S[:, :, j0:j0 + block] = (qg * p[:, None, j0:j0 + block]).sum(-1)  # (B, N, Mb)
        ctx.save_for_backward(ids, p)
        ctx.block, ctx.q_shape = block, q.shape
        return S

    @staticmethod
    def backward(ctx, dS):  # (B, N, M)
        ids, p = ctx.saved_tensors
        B, N, _ = ctx.q_shape
        dq = dS.new_zeros(ctx.q_shape)
        for j0 in range(0, ids.shape[1], ctx.block):
            idx = ids[:, j0:j0 + ctx.block].reshape(B, 1, -1).expand(B, N, -1)  # (B, N, Mb*k)
            contrib = dS[:, :, j0:j0 + ctx.block, None] * p[:, None, j0:j0 + ctx.block]  # (B, N, Mb, k)
            dq.scatter_add_(2, idx, contrib.reshape(B, N, -1))
        return dq, None, None, None


def ot_logits_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                   x_mask: torch.Tensor, y_mask: torch.Tensor, *, eps: float = OT_EPS, block: int = 64,
                   vocab_size: int | None = None, objective: str = "linear", reduction: str = "mean",
                   tol: float | None = None, max_iter: int = 1000) -> tuple[torch.Tensor, SinkhornResult]:
    """Entropic OT between student and teacher next-token distributions of one sequence, batched.

    student_logits: (B, N, V) raw logits (first vocab_size columns real); teacher_ids (B, M, k) long and
    teacher_logprobs (B, M, k) from the cache; x_mask (B, N), y_mask (B, M).
        q_i = softmax(student_logits_i)                        (B, N, V)
        S_ij = sum_{v in topk(j)} q_i(v) p_j(v)                (B, N, M)
        C = 1 - softmax_j(S), T* and the loss as in `ot_hidden_loss`.
    Scaling: S uses probabilities on both sides, so S_ij is the probability that student position i and
    teacher position j emit the same token (restricted to the teacher's top-k; the teacher tail is ignored):
    bounded in [0, 1], 1 only for identical one-hot predictions, independent of V and k. Products of
    log-probs would instead be unbounded (k * log(V)^2 scale) and largest for the *least* confident pairs,
    which is not a similarity. Consequence: the row softmax sees differences of at most 1, so C is soft; a
    smaller eps sharpens the plan.
    block: teacher tokens per block of the gather (memory: B x block x N x k, see _TopkSimilarity).
    Returns (loss scalar, SinkhornResult).
    """
    q = _upcast(student_logits[..., :vocab_size]).softmax(-1)  # (B, N, V)
    p = teacher_logprobs.to(q.dtype).exp()  # (B, M, k)
    S = _TopkSimilarity.apply(q, teacher_ids.long(), p, block)  # (B, N, M)
    C = cost_from_similarity(S, y_mask)
    per_seq, res = ot_loss(C, x_mask, y_mask, eps, objective, tol=tol, max_iter=max_iter)  # (B,)
    return reduce_sequences(per_seq, x_mask, y_mask, reduction), res

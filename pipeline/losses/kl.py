"""Hard-label cross-entropy and KL on the teacher's cached top-k (+ one tail bucket), on full logits.

Pure functions of tensors; masks are explicit bool tensors (True = counts; other dtypes are refused). Every
loss returns 0 with zero gradients when nothing is supervised, never NaN. Stage 2 computes the same values
without full logits in `pipeline/losses/fused_ce_kl.py`; these plain versions are its reference (tests) and
serve evaluation.
Imports only torch.
"""

import torch
import torch.nn.functional as F

from pipeline.losses.checks import check_mask, check_positive

# Teacher log-probs are floored here before use; Stage 1 floors the tail mass it stores at the same value
# (cache/schema.py LOG_FLOOR, repeated here because the losses import only torch; tests/test_topk.py checks the two
# are equal, or a stored tail would be read back as another value). exp(-80) ~ 1.8e-35 is "no mass" at float32
# precision, and a finite floor keeps p (log p - log q) at 0 instead of 0 * (-inf) = NaN when the cache holds -inf.
LOG_FLOOR = -80.0


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32: log-softmax and logsumexp must not run in half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy on hard labels
# ---------------------------------------------------------------------------------------------------------


def ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, *, vocab_size: int | None = None
) -> torch.Tensor:
    """Next-token cross-entropy; logits[:, t] predicts labels[:, t + 1] (the shift happens here).

    logits: (B, L, V), labels: (B, L) long with -100 = ignore.
    num_items_in_batch: supervised-token count over all gradient-accumulation micro-batches (what
        transformers.Trainer passes), so that summing micro-batch losses gives the true token mean; default:
        this batch's supervised count.
    vocab_size: use only the first vocab_size logit columns (the rest are padding, not tokens).
    Returns a scalar: sum of token NLL / count (0 with zero gradient if nothing is supervised).
    """
    logits = upcast(logits[:, :-1, :vocab_size])  # (B, L-1, V)
    labels = labels[:, 1:]  # (B, L-1)
    # reduction="sum" with every label ignored gives exactly 0 and zero gradients (a "mean" would be 0/0)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    n = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return nll / torch.as_tensor(n, device=nll.device).clamp_min(1).to(nll.dtype)


# ---------------------------------------------------------------------------------------------------------
# KL on the cached top-k + tail bucket
# ---------------------------------------------------------------------------------------------------------


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    reverse: bool = False,
    vocab_size: int | None = None,
    num_items=None,
) -> torch.Tensor:
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
    check_mask(mask, "mask")
    check_positive(temperature, "temperature")
    # Only the supervised rows are computed; the others get exactly zero gradient from the indexing.
    z = upcast(student_logits[..., :vocab_size][mask]) / temperature  # (R', V)
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
        # 0 log 0 = 0: a -inf student logit at a teacher id gives s = -inf, and Q (s - t) would be 0 * -inf =
        # NaN in value and gradient. The most negative finite s has exp(s) = 0 exactly, so the term is 0 and
        # its gradient Q (s - t + 1) too.
        s = s.clamp_min(torch.finfo(s.dtype).min)
        kl = (s.exp() * (s - t)).sum(-1)  # (R',) KL(student || teacher)
    else:
        kl = (t.exp() * (t - s)).sum(-1)  # (R',) KL(teacher || student)
    n = mask.sum() if num_items is None else num_items
    n = torch.as_tensor(n, device=kl.device).clamp_min(1).to(kl.dtype)
    return kl.sum() * temperature**2 / n

"""Teacher top-k log-probabilities and tail mass, chunked over tokens (Stage 1's per-token math).

The cache stores, per supervised position, the top-k of the teacher's log-softmax over the FULL real
vocabulary (not top-k of raw logits renormalised, which Axolotl's maintainers call "mostly incorrect for KD")
plus the log of the probability mass outside the top-k, and the log-prob of the token actually observed next
(in the top-k or not). Imports only torch (and the cache's LOG_FLOOR).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

# The stored tail is floored at the cache's LOG_FLOOR, the value Stage 2's losses clamp teacher log-probs to: a
# tail stored below it would be read back as a different value than Stage 1 computed, and a floor above it would
# give mass the teacher never had.
from cache.schema import LOG_FLOOR


class TopK(NamedTuple):
    """What `topk_logprobs` / `topk_from_hidden` return (a tuple: `ids, logprobs, tail, observed = ...`)."""

    ids: torch.Tensor  # (R, k) int64, descending probability
    logprobs: torch.Tensor  # (R, k) float32
    tail: torch.Tensor  # (R,) float32   log of the mass outside the top-k, >= LOG_FLOOR
    observed: torch.Tensor | None  # (R,) float32   log p(targets[r]), >= LOG_FLOOR; None when no targets are given


def topk_logprobs(
    logits: torch.Tensor, k: int, vocab_size: int | None = None, targets: torch.Tensor | None = None
) -> TopK:
    """Top-k log-probs of a block of logits.

    logits: (R, V_logits) in any float dtype; only the first `vocab_size` columns are real tokens
    (Qwen2.5 pads logits to 151,936 / 152,064 columns for a 151,665-entry tokenizer), the rest are dropped
    before the softmax so they can never be candidates nor take mass.
    targets: (R,) ids in [0, vocab_size), the token each row is followed by (a row's target, input_ids[j+1]).
    Returns TopK: ids (R, k) int64 in descending-probability order, logprobs (R, k) float32, tail (R,) float32
    with tail = log(1 - sum(exp(logprobs))), computed exactly as logsumexp over the non-top-k logits, and
    observed (R,) float32 = logits[r, targets[r]] - logsumexp (the same normaliser as the top-k, so a target in the
    top-k gets exactly its top-k value), floored at LOG_FLOOR; None without targets.
    """
    V = logits.shape[-1] if vocab_size is None else vocab_size
    if not 0 < k <= V:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {V}")
    if targets is not None:
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"targets has shape {tuple(targets.shape)}, expected ({logits.shape[0]},)")
        # a padded logit column is no token, and an id beyond the logits would be a device-side assert on CUDA
        if ((targets < 0) | (targets >= V)).any():  # one host sync per chunk
            raise ValueError(f"targets must be token ids in [0, {V})")
    # (R, V) fp32 copy: log-softmax must not run in bf16, and the copy is ours to overwrite in place below
    x = logits[:, :V].to(torch.float32, copy=True)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (R, 1)
    top_vals, ids = torch.topk(x, k, dim=-1)  # (R, k)
    logprobs = top_vals - lse  # (R, k)
    observed = None
    if targets is not None:
        # a gather, before the scatter below overwrites the top-k columns of x
        at = x.gather(-1, targets.to(device=x.device, dtype=torch.long)[:, None])  # (R, 1)
        observed = (at - lse)[:, 0].clamp_min(LOG_FLOOR)  # (R,)
    if k == V:
        tail = torch.full_like(lse[:, 0], LOG_FLOOR)
    else:
        # The tail from the excluded logits themselves, not log1p(-sum p): the subtraction cancels
        # catastrophically (and goes NaN) when the top-k hold ~all the mass.
        x.scatter_(-1, ids, float("-inf"))  # (R, V) in place: no second R×V buffer
        tail = (torch.logsumexp(x, dim=-1) - lse[:, 0]).clamp_min(LOG_FLOOR)  # (R,)
    return TopK(ids, logprobs, tail, observed)


def topk_from_hidden(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    vocab_size: int,
    chunk_rows: int = 1024,
    targets: torch.Tensor | None = None,
) -> TopK:
    """`topk_logprobs` of lm_head(hidden), chunked over rows.

    hidden: (R, D) final hidden states (the input of lm_head). At most chunk_rows × V fp32 logits exist at
    once, so a 7B teacher's 152k-column logits never exist for a whole batch. targets: (R,) or None, as in
    `topk_logprobs` (split into the same chunks).
    """
    if targets is not None and targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected ({hidden.shape[0]},)")
    chunks = hidden.split(chunk_rows)
    tchunks = targets.split(chunk_rows) if targets is not None else [None] * len(chunks)
    outs = [topk_logprobs(lm_head(h), k, vocab_size, t) for h, t in zip(chunks, tchunks)]
    if not outs:  # no supervised rows in this batch
        e = hidden.new_empty
        return TopK(
            torch.empty(0, k, dtype=torch.long, device=hidden.device),
            e(0, k, dtype=torch.float32),
            e(0, dtype=torch.float32),
            None if targets is None else e(0, dtype=torch.float32),
        )
    ids, logprobs, tail, observed = zip(*outs)
    return TopK(torch.cat(ids), torch.cat(logprobs), torch.cat(tail), None if targets is None else torch.cat(observed))

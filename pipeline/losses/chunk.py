"""Cross-tokenizer losses on chunks of text: the teacher's exact probabilities of the events a student row can emit.

Under teacher forcing the teacher's probability of a student token that spans teacher tokens t_1..t_L is a product
of its conditional probabilities along the observed text, readable from the cache (top-k log-probs and the observed
token's log-prob of each row). For one student row (aligned with teacher row j, its token spanning rows j..j+L-1,
prefix = t_1..t_{L-1}, l_prefix = the observed log-probs summed over the prefix) the events are, in this layout:

    groups   (k+1)  first pieces a: the student tokens whose longest teacher-token prefix is a (`first_piece`);
                    P_T = p_j(a). Slots: row j's top-k, then t_1 itself when it is outside the top-k.
                    L >= 2: t_1's group is refined by the singles below, so it is not an event.
    singles  (k+2)  L >= 2 only: completions prefix.v for v in row j+L-1's top-k whose string is a student token,
                    P_T = exp(l_prefix + lp(v)); the observed completion when t_L is outside that top-k; the run-end
                    (the prefix alone as a student token: the teacher's next v does not extend it),
                    P_T = exp(l_prefix) * (1 - the mass of the v that do).
    rest     (1)    everything else, so that both sides sum to 1.

Rows where the boundaries agree (L = 1) reduce to the mapped KL, with one difference that matters: a teacher
token's mass goes to every student token that starts with it ("5" -> "5", "50".."59"), not to the one student
token with its spelling, which the student's own tokenization may never emit (the "uncommon-token" failure).
Which ids belong to which event is data (pipeline/distill/chunks.py); here only the arithmetic. Imports only torch.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.losses.checks import check_mask
from pipeline.losses.chunked import default_chunk_rows
from pipeline.losses.kl import LOG_FLOOR


def event_index(groups: torch.Tensor, singles: torch.Tensor, first_piece: torch.Tensor, n_teacher: int):
    """(C, V) long: the event of every student id at each row - a single's slot (G + s) where the id is one of the
    row's singles, else the group slot g whose teacher id is the id's first piece, else the rest (G + S).

    groups: (C, G) teacher ids (-1 = no event), distinct among the valid slots; singles: (C, S) student ids (-1 =
    none), distinct among the valid slots; first_piece: (V,) teacher id per student id (-1 = none)."""
    C, G = groups.shape
    S = singles.shape[1]
    rest = G + S
    table = groups.new_full((C, n_teacher + 1), rest)  # teacher id -> group slot; column n_teacher = "none"
    slot = torch.arange(G, device=groups.device).expand(C, G)
    ok = groups >= 0
    table.scatter_(1, torch.where(ok, groups, n_teacher), torch.where(ok, slot, rest))
    fp = torch.where(first_piece >= 0, first_piece, n_teacher)  # (V,)
    ev = table.gather(1, fp.expand(C, -1))  # (C, V)
    # singles override groups; an unused slot rewrites the row's first valid single with the same value (or, in a
    # row without any, one entry with its own value), so duplicate indices never carry different values
    sv = singles >= 0
    has = sv.any(1, keepdim=True)  # (C, 1)
    first = sv.float().argmax(1, keepdim=True)  # (C, 1) slot of the first valid single
    idx = torch.where(sv, singles, torch.where(has, singles.gather(1, first), 0))  # (C, S)
    val = torch.where(sv, G + torch.arange(S, device=groups.device), torch.where(has, G + first, ev.gather(1, idx)))
    return ev.scatter_(1, idx, val)


def _chunk_events(h, W, b, groups, singles, first_piece, n_teacher, dtype):
    z = (h.to(W.dtype) @ W.T).to(dtype)  # (C, V)
    if b is not None:
        z = z + b.to(dtype)
    lse = torch.logsumexp(z, -1, keepdim=True)  # (C, 1)
    ev = event_index(groups, singles, first_piece, n_teacher)  # (C, V)
    E = groups.shape[1] + singles.shape[1] + 1
    # an exact logsumexp per event: shift by the event's own max (a constant: the result does not depend on it),
    # so an event of tiny mass reads its true log-prob instead of underflowing to -inf
    zd = z.detach()
    m = zd.new_full((len(z), E), float("-inf")).scatter_reduce(1, ev, zd, "amax")  # (C, E); empty event: -inf
    s = torch.zeros_like(m).scatter_add(1, ev, (z - m.gather(1, ev)).exp())  # (C, E)
    return m + s.log() - lse  # (C, E)


def event_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    groups: torch.Tensor,
    singles: torch.Tensor,
    first_piece: torch.Tensor,
    *,
    n_teacher: int,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The student's log-probabilities of each row's events (R, G+S+1), from hidden states (see `event_index`).

    h: (R, d); weight: (V_logits, d) lm_head; q = softmax(h W^T + bias) over the first vocab_size columns. Events no
    student id belongs to read -inf (the loss moves the teacher's mass there into the rest). Computed over row
    chunks, each recomputed in the backward pass (checkpoint) when there are several, so only one chunk's (C, V)
    buffers exist at a time.
    """
    V = vocab_size or weight.shape[0]
    if first_piece.shape != (V,):
        raise ValueError(f"first_piece must have one entry per student id ({V}), got {tuple(first_piece.shape)}")
    W = weight[:V]
    b = bias[:V] if bias is not None else None
    dtype = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 in the tests
    # ~5 (C, V) buffers live per chunk (logits, their exp, the event index, gathers), two of them int64: an eighth
    # of the fused CE's chunk keeps the peak near its two float32 buffers
    rows = chunk_rows or max(1, default_chunk_rows(V) // 8)
    fp = first_piece.to(h.device)
    # one chunk: its buffers are what the bound allows anyway, so autograd keeps them; more: each is recomputed
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, W, b))
    recompute = grad and h.shape[0] > rows
    outs = []
    for r0 in range(0, h.shape[0], rows):
        sl = slice(r0, r0 + rows)
        args = (h[sl], W, b, groups[sl], singles[sl], fp, n_teacher, dtype)
        outs.append(checkpoint(_chunk_events, *args, use_reentrant=False) if recompute else _chunk_events(*args))
    if not outs:
        return h.new_zeros(0, groups.shape[1] + singles.shape[1] + 1, dtype=dtype)
    return torch.cat(outs)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x is clamped just below 0."""
    x = x.clamp_max(-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_teacher_events(
    first_lp: torch.Tensor,
    first_obs: torch.Tensor,
    last_lp: torch.Tensor,
    prefix_lp: torch.Tensor,
    chunk_lp: torch.Tensor,
    boundary: torch.Tensor,
    ok: torch.Tensor,
) -> torch.Tensor:
    """The teacher's log-probabilities of each row's events (R, 2k+4), in the module's layout.

    first_lp: (R, k) row j's top-k log-probs; first_obs: (R,) log p_j(t_1); last_lp: (R, k) row j+L-1's top-k
    log-probs; prefix_lp: (R,) l_prefix; chunk_lp: (R,) l_prefix + log p(t_L); boundary: (R, k) slots of row
    j+L-1 at which the student's token ends after the prefix; ok: (R, 2k+3) which group and single slots are events.
    The run-end gets every continuation of the prefix that is not known to extend it - the top-k slots that are not
    boundaries and the observed completion are subtracted, so the uncached tail counts as ending the token (of a
    vocabulary's tokens, only a few extend a given prefix into a student token). The rest is 1 - the events' mass,
    floored at exp(LOG_FLOOR) (rounded top-k log-probs may sum past 1). Slots that are not events read LOG_FLOOR.
    """
    check_mask(ok, "ok")
    k = first_lp.shape[1]
    first_lp, last_lp = first_lp.clamp_min(LOG_FLOOR), last_lp.clamp_min(LOG_FLOOR)
    obs_last = (chunk_lp - prefix_lp)[:, None]  # (R, 1) log p(t_L)
    extends = torch.cat(
        [
            torch.where(boundary, float("-inf"), last_lp),
            torch.where(ok[:, 2 * k + 1 :][:, :1], obs_last, float("-inf")),
        ],
        -1,
    )
    run_end = prefix_lp + log1mexp(extends.logsumexp(-1))  # (R,)
    t = torch.cat(
        [first_lp, first_obs[:, None], prefix_lp[:, None] + last_lp, chunk_lp[:, None], run_end[:, None]], -1
    )  # (R, 2k+3)
    t = torch.where(ok, t.clamp_min(LOG_FLOOR), LOG_FLOOR)
    mass = torch.where(ok, t, float("-inf")).logsumexp(-1)  # (R,) log of the events' total
    rest = torch.log((-torch.expm1(mass.clamp_max(0.0))).clamp_min(math.exp(LOG_FLOOR)))  # (R,)
    return torch.cat([t, rest[:, None].to(t.dtype)], -1)


def chunk_kl(s: torch.Tensor, t: torch.Tensor, ok: torch.Tensor, mask: torch.Tensor, num_items=None) -> torch.Tensor:
    """KL(teacher || student) over each row's events, summed over rows in `mask` / (num_items or their count).

    s: (R, E) student event log-probs (`event_logprobs`), t: (R, E) teacher's (`chunk_teacher_events`), ok: (R, E-1)
    which slots are events (the rest, the last column, always is). An event no student id belongs to (s = -inf)
    gives its teacher mass to the rest; a row whose student side has no rest drops it, the teacher renormalised.
    0 with zero gradients when no row counts.
    """
    check_mask(mask, "mask")
    full = torch.cat([check_mask(ok, "ok"), torch.ones_like(ok[:, :1])], -1) & mask[:, None]  # (R, E)
    t = t.to(s.dtype)
    has = s.detach().isfinite()
    moved = full & ~has  # teacher mass the student cannot hold in that slot
    moved[:, -1] = False
    t_rest = torch.logaddexp(t[:, -1], torch.where(moved, t, float("-inf")).logsumexp(-1))  # (R,)
    t = torch.cat([t[:, :-1], t_rest[:, None]], -1)
    full = full & has
    tt = torch.where(full, t, float("-inf"))
    tt = torch.where(full.any(-1, keepdim=True), tt.log_softmax(-1), float("-inf"))  # renormalised over events
    kl = torch.where(full, tt.exp() * (tt - torch.where(full, s, 0.0)), 0.0).sum(-1)  # (R,)
    n = mask.sum() if num_items is None else num_items
    return kl.sum() / torch.as_tensor(n, device=kl.device).clamp_min(1).to(kl.dtype)


def alm_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, num_items=None) -> torch.Tensor:
    """Chunk likelihood matching (after ALM, Minixhofer et al. 2025): per chunk of text both tokenizations start and
    end at, the binary KL between the teacher's and the student's probability of the chunk, summed over chunks in
    `mask` / (num_items or their count).

    s: (C,) the student's log-probability of each chunk (its observed tokens' log-probs summed), t: (C,) the
    teacher's (the cached observed log-probs summed); 0 when both agree, whatever the chunk's length."""
    check_mask(mask, "mask")
    t = t.to(s.dtype).clamp(LOG_FLOOR, 0.0)
    p = t.exp()
    kl = p * (t - s) + (1 - p) * (log1mexp(t) - log1mexp(s))  # (C,)
    n = mask.sum() if num_items is None else num_items
    return torch.where(mask, kl, 0.0).sum() / torch.as_tensor(n, device=kl.device).clamp_min(1).to(kl.dtype)

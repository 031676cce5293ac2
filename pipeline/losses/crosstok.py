"""Losses between a student and a teacher with different vocabularies, from hidden states without full logits.

The student's side of every term is a handful of bucket log-probabilities per row, never a (rows x vocab) tensor:

    bucket_logprobs(h, W, ids, valid)  (R, k+1) = [log q(ids_c) for the valid slots c, log q(everything else)]

computed chunk by chunk over rows (two (chunk, V) float32 buffers, as in fused_ce_kl) with a hand-written backward
(only (R, d) expected embeddings are kept). On top of it, pure functions of small tensors:

    bucket_kl      KL(teacher || student) over buckets: the teacher's top-k ids mapped to identical student strings,
                   plus one bucket for everything else (the teacher's tail and its unmapped top-k mass)
    uld_loss       ULD (Boizard et al. 2024): L1 between the sorted top-k probabilities of both sides (+ the rest)
    token_ot_loss  entropic OT between two weighted point clouds per row (the student's top-k at its embedding rows,
                   the teacher's cached top-k at its projected embedding rows), cost 1 - cosine; the regularised value
                   OT_eps(a, b) = <T, C> + eps KL(T || a b^T), whose gradients are the envelope's: T, f, g.
Imports only torch.
"""

import torch

from pipeline.losses.checks import check_mask, check_positive
from pipeline.losses.chunked import SLICE, chunked_logsumexp, default_chunk_rows
from pipeline.losses.kl import LOG_FLOOR, upcast


def _logits(h, W, b, mm_dtype, scale):
    z = (h.to(mm_dtype) @ W.T).float()  # (C, V)
    if b is not None:
        z += b
    return z.div_(scale[:, None]) if scale is not None else z  # scale: (C,) per row


def _rest_scatter(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
    """Set z at the valid ids of each row to the float minimum (exp -> 0), in place, so that a logsumexp over z is
    the log-mass of everything else. Invalid slots are pointed at the row's first valid id (writing the same value
    twice is safe); a row without a valid slot rewrites one logit with its own value (a no-op)."""
    has = valid.any(-1, keepdim=True)  # (C, 1)
    first = ids.gather(-1, valid.float().argmax(-1, keepdim=True))  # (C, 1) id of the first valid slot
    idx = torch.where(valid, ids, first)  # (C, k)
    val = torch.where(has, torch.finfo(z.dtype).min, z.gather(-1, idx))  # (C, k)
    z.scatter_(-1, idx, val)


class _BucketLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ids, valid, scale, V, chunk_rows, need_h, need_w, need_b):
        R, d = h.shape
        k = ids.shape[1]
        W = weight[:V]
        b = bias[:V].float() if bias is not None else None
        mm = weight.dtype
        out = torch.zeros(R, k + 1, device=h.device)  # (R, k+1)
        lse = torch.empty(R, 1, device=h.device)
        lse_rest = torch.empty(R, 1, device=h.device)
        m = torch.empty(R, d, device=h.device) if need_h else None  # (R, d) sum_v q_v W_v
        m_rest = torch.empty(R, d, device=h.device) if need_h else None  # (R, d) sum_{v not in ids} r_v W_v
        for r0 in range(0, R, chunk_rows):
            sl = slice(r0, r0 + chunk_rows)
            sc = scale[sl] if scale is not None else None
            z = _logits(h[sl], W, b, mm, sc)  # (C, V)
            lse[sl] = chunked_logsumexp(z)
            out[sl, :k] = torch.where(valid[sl], z.gather(-1, ids[sl]) - lse[sl], 0.0)
            if need_h:  # SLICE rows at a time: no third (C, V) buffer
                for zs, ls, ms in zip(z.split(SLICE), lse[sl].split(SLICE), m[sl].split(SLICE)):
                    ms.copy_(((zs - ls).exp_().to(mm) @ W).float())
            _rest_scatter(z, ids[sl], valid[sl])
            lse_rest[sl] = chunked_logsumexp(z)
            out[sl, k] = (lse_rest[sl] - lse[sl])[:, 0]
            if need_h:
                m_rest[sl] = (z.sub_(lse_rest[sl]).exp_().to(mm) @ W).float()
            z = None
        ctx.save_for_backward(h, weight, bias, ids, valid, scale, lse, lse_rest, m, m_rest)
        ctx.cfg = (V, chunk_rows, need_h, need_w, need_b)
        return out

    @staticmethod
    def backward(ctx, g):  # (R, k+1)
        h, weight, bias, ids, valid, scale, lse, lse_rest, m, m_rest = ctx.saved_tensors
        V, chunk_rows, need_h, need_w, need_b = ctx.cfg
        W = weight[:V]
        b = bias[:V].float() if bias is not None else None
        mm = weight.dtype
        k = ids.shape[1]
        gk = torch.where(valid, g[:, :k].float(), 0.0)  # (R, k) invalid slots carry no gradient
        gT = g[:, k:].float()  # (R, 1)
        G = gk.sum(-1, keepdim=True) + gT  # (R, 1)
        inv = (1.0 / scale)[:, None] if scale is not None else 1.0  # d z / d logits
        dh = dW = db = None
        if need_h:  # dz = scatter(gk at ids) + gT r - G q  ->  dh = (gk W[ids] + gT m_rest - G m) / scale
            dh = (torch.einsum("rk,rkd->rd", gk.to(mm), W[ids]).float() + gT * m_rest - G * m) * inv
        if need_w or need_b:
            dW = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            db = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            for r0 in range(0, h.shape[0], chunk_rows):
                sl = slice(r0, r0 + chunk_rows)
                sc = scale[sl] if scale is not None else None
                z = _logits(h[sl], W, b, mm, sc)  # (C, V)
                q = (z - lse[sl]).exp_()  # (C, V)
                _rest_scatter(z, ids[sl], valid[sl])
                dz = z.sub_(lse_rest[sl]).exp_().mul_(gT[sl]).sub_(q.mul_(G[sl]))  # gT r - G q
                q = None
                dz.scatter_add_(-1, ids[sl], gk[sl])
                if scale is not None:
                    dz.div_(scale[sl][:, None])
                if need_w:
                    dW[:V].addmm_(dz.T, h[sl].float())
                if need_b:
                    db[:V] += dz.sum(0)
                dz = z = None
        return (
            dh.to(h.dtype) if need_h else None,
            dW.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def bucket_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Student log-probabilities of buckets, from hidden states: (R, k+1) = [log q(ids_c)]_c ++ [log q(rest)].

    h: (R, d) final hidden states; weight: (V_logits, d) lm_head (its gradient only if it requires grad); ids: (R, k)
    student token ids, distinct within a row among the valid slots; valid: (R, k) bool (default all) - invalid slots
    read 0 and get no gradient, and their ids stay in the rest bucket. q = softmax(z) over the first vocab_size
    columns, z = (h W^T + bias) / scale, scale a float or (R,) per-row temperature (treated as a constant).
    The rest bucket is a logsumexp over the logits outside the valid ids, exact even when they hold ~no mass.
    """
    R = h.shape[0]
    V = vocab_size or weight.shape[0]
    ids = ids.long()
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else check_mask(valid, "valid")
    inside = (ids >= 0) & (ids < V)
    if not inside[valid].all():
        raise ValueError(f"ids of valid slots must lie in [0, {V}), got {ids[valid][~inside[valid]][0].item()}")
    ids = torch.where(valid, ids, 0)
    if scale is not None and not isinstance(scale, torch.Tensor):
        check_positive(scale, "scale")
        scale = torch.full((R,), float(scale), device=h.device)
    if scale is not None:
        scale = scale.detach().float()
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (h, weight, bias)]
    return _BucketLogprobs.apply(h, weight, bias, ids, valid, scale, V, chunk_rows or default_chunk_rows(V), *need)


@torch.no_grad()
def student_topk(
    h: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's own top-k ids per row (R, k), in descending order, and the std of its logits (R,) over the
    vocabulary (for the adaptive temperature); chunked, no gradient (bucket_logprobs then differentiates at them)."""
    V = vocab_size or weight.shape[0]
    W = weight[:V]
    b = bias[:V].float() if bias is not None else None
    rows = chunk_rows or default_chunk_rows(V)
    ids, std = [], []
    for r0 in range(0, h.shape[0], rows):
        z = _logits(h[r0 : r0 + rows], W, b, weight.dtype, None)  # (C, V)
        ids.append(z.topk(min(k, V), -1).indices)
        std.append(z.std(-1))
    return torch.cat(ids), torch.cat(std)


def mapped_teacher_buckets(t_logprobs: torch.Tensor, t_tail: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """Teacher bucket log-probs (R, k+1) for `bucket_kl`: its top-k log-probs at the mapped slots (LOG_FLOOR at the
    others, which `valid` excludes) and, as the last bucket, the log of its tail mass plus its unmapped top-k mass -
    everything the student can only receive in its own rest bucket."""
    t = t_logprobs.float().clamp_min(LOG_FLOOR)  # (R, k)
    unmapped = torch.where(mapped, LOG_FLOOR, t)  # (R, k)
    rest = torch.logsumexp(torch.cat([unmapped, t_tail.float().clamp_min(LOG_FLOOR)[:, None]], -1), -1)  # (R,)
    return torch.cat([torch.where(mapped, t, LOG_FLOOR), rest[:, None]], -1)


def bucket_kl(
    s: torch.Tensor,
    t: torch.Tensor,
    valid: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items=None,
) -> torch.Tensor:
    """KL(teacher || student) over buckets, summed over rows in `mask` / (num_items or their count), x tau^2.

    s: (R, k+1) student bucket log-probs (from `bucket_logprobs` with scale = tau), t: (R, k+1) teacher bucket
    log-probs (`mapped_teacher_buckets`); valid: (R, k) bool slots that are buckets (the last bucket always is);
    mask: (R,) rows that count. The teacher's buckets are tempered as in topk_kl_loss: t / tau renormalised over
    the valid buckets. 0 with zero gradients when no row counts.
    """
    check_mask(mask, "mask")
    check_positive(temperature, "temperature")
    ok = torch.cat([check_mask(valid, "valid"), torch.ones_like(valid[:, :1])], -1) & mask[:, None]  # (R, k+1)
    tt = torch.where(ok, t.to(s.dtype).clamp_min(LOG_FLOOR) / temperature, float("-inf"))
    tt = torch.where(mask[:, None], tt.log_softmax(-1), float("-inf"))  # (R, k+1); masked rows: all -inf
    P = tt.exp()
    kl = torch.where(ok, P * (tt - torch.where(ok, s, 0.0)), 0.0).sum(-1)  # (R,)
    n = mask.sum() if num_items is None else num_items
    return kl.sum() * temperature**2 / torch.as_tensor(n, device=kl.device).clamp_min(1).to(kl.dtype)


def uld_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, num_items=None) -> torch.Tensor:
    """ULD: sum_c |q_(c) - p_(c)| over the ranks of both top-k (sorted descending) plus |q_rest - p_rest|, per row,
    summed over rows in `mask` / (num_items or their count). s: (R, k+1) the student's log-probs of its own top-k
    (descending) + rest; t: (R, k+1) the teacher's top-k log-probs (descending, as cached) + tail. Needs no map:
    it compares only the shapes of the two distributions."""
    check_mask(mask, "mask")
    q = s.exp()  # (R, k+1)
    p = torch.where(mask[:, None], t.to(s.dtype), LOG_FLOOR).exp()
    k = min(q.shape[1], p.shape[1]) - 1
    ranks = torch.cat([q[:, :k].sort(-1, descending=True).values, q[:, -1:]], -1)  # the student's slots re-sorted
    d = (ranks - torch.cat([p[:, :k], p[:, -1:]], -1)).abs().sum(-1)  # (R,)
    n = mask.sum() if num_items is None else num_items
    return torch.where(mask, d, 0.0).sum() / torch.as_tensor(n, device=d.device).clamp_min(1).to(d.dtype)


def entropic_ot(
    C: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, eps: float, tol: float = 1e-6, max_iter: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn with weighted marginals, batched: C (R, n, m), log_a (R, n), log_b (R, m) (-inf = no
    mass; each row needs some mass on both sides). Returns (value (R,), plan (R, n, m), f (R, n), g (R, m)) of
        OT_eps = min_T <T, C> + eps KL(T || a b^T),  T = a_i b_j exp((f_i + g_j - C_ij) / eps),
    value = <f, a> + <g, b> at convergence (L1 marginal error <= tol). No autograd: see `token_ot_loss`."""
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(max_iter):
        f = -eps * torch.logsumexp(log_b[:, None, :] + (g[:, None, :] - C) / eps, -1)  # (R, n)
        g = -eps * torch.logsumexp(log_a[:, :, None] + (f[:, :, None] - C) / eps, -2)  # (R, m)
        logT = log_a[:, :, None] + log_b[:, None, :] + (f[:, :, None] + g[:, None, :] - C) / eps  # (R, n, m)
        err = (logT.exp().sum(-1) - log_a.exp()).abs().sum(-1)  # (R,) row marginals (columns are exact)
        if bool((err <= tol).all()):
            break
    f, g = torch.where(log_a.isfinite(), f, 0.0), torch.where(log_b.isfinite(), g, 0.0)
    T = logT.exp()
    value = (f * log_a.exp()).sum(-1) + (g * log_b.exp()).sum(-1)
    return value, T, f, g


class _TokenOT(torch.autograd.Function):
    """OT_eps(a, b, C) with the envelope gradients dC = T, d log_a = a * f (the simplex direction is what counts:
    log_a is a log-softmax in practice), d log_b = b * g."""

    @staticmethod
    def forward(ctx, C, log_a, log_b, eps, tol, max_iter):
        value, T, f, g = entropic_ot(C.detach(), log_a.detach(), log_b.detach(), eps, tol, max_iter)
        ctx.save_for_backward(T, f * log_a.exp(), g * log_b.exp())
        return value

    @staticmethod
    def backward(ctx, dv):  # (R,)
        T, fa, gb = ctx.saved_tensors
        return dv[:, None, None] * T, dv[:, None] * fa, dv[:, None] * gb, None, None, None


def token_ot_loss(
    log_a: torch.Tensor,
    xs: torch.Tensor,
    log_b: torch.Tensor,
    yt: torch.Tensor,
    proj: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 0.1,
    tol: float = 1e-6,
    max_iter: int = 1000,
    num_items=None,
) -> torch.Tensor:
    """Token-level OT in embedding geometry, summed over rows in `mask` / (num_items or their count).

    log_a: (R, n) the student's log-probs over its own top-n tokens (renormalised; gradients flow), xs: (R, n, d)
    their embedding rows; log_b: (R, m) the teacher's over its cached top-m (-inf = slot not used), yt: (R, m, D)
    their teacher embedding rows; proj: (D, d) learned projection. Cost C_ij = 1 - cos(xs_i, yt_j P) in [0, 2]:
    tokens of different vocabularies exchange mass by meaning, without a string map.
    """
    check_mask(mask, "mask")
    check_positive(eps, "eps")
    y = yt.to(proj.dtype) @ proj  # (R, m, d)
    x = torch.nn.functional.normalize(upcast(xs), dim=-1)
    y = torch.nn.functional.normalize(upcast(y), dim=-1)
    C = 1.0 - x @ y.transpose(1, 2)  # (R, n, m)
    # rows that do not count get a harmless problem (uniform marginals) and are summed with weight 0
    la = torch.where(mask[:, None], upcast(log_a), 0.0).log_softmax(-1)
    lb = torch.where(mask[:, None], upcast(log_b).to(la.dtype), 0.0).log_softmax(-1)
    v = _TokenOT.apply(C, la, lb, float(eps), float(tol), int(max_iter))  # (R,)
    n = mask.sum() if num_items is None else num_items
    return torch.where(mask, v, 0.0).sum() / torch.as_tensor(n, device=v.device).clamp_min(1).to(v.dtype)

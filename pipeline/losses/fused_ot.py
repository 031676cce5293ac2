"""OT on logits straight from hidden states: the student side is built only at the teacher's top-k ids.

`ot_logits_loss` (pipeline/losses/ot.py) needs the student's probabilities q_i = softmax(h_i W^T) only at the
teacher's top-k ids of each teacher token j:

    S_ij = sum_c q_i(ids_jc) p_jc            (B, N, M)

so the full-vocabulary logits are never needed as a tensor: q_i(v) = exp(h_i . W_v - lse_i) with one scalar
lse_i per row. Here lse_i (and m_i = sum_v q_i(v) W_v, the row's expected embedding, for the backward) come
from one pass over row chunks of the vocabulary (two (chunk_rows, V) float32 buffers, like the fused CE/KL),
then per sequence and per block of teacher tokens J only the union U of their ids is materialised:
h_b W[U]^T (N, |U|), |U| <= block * k. Peak: N x block x k gathered elements, independent of V.

Backward, with dq_iu = sum over (j, c) with ids_jc = u of dS_ij p_jc and g = q * dq (on U):
    dz_iv = g_iv [v in U] - q_iv t_i,   t_i = sum_u g_iu
    dh_i  = g_i W[U] - t_i m_i          (summed over blocks; U blocks may overlap, the sum is still exact)
    dW    = g^T h on U rows, minus sum_i t_i q_i(v) h_i over the whole vocabulary (chunked recompute, only
            when W trains: under QLoRA the lm_head is frozen and no V x d buffer is allocated).
Imports only torch.
"""

import torch

from pipeline.losses.chunked import chunked_logsumexp, default_chunk_rows
from pipeline.losses.ot import OTSolver, check_masks, cost_from_similarity, cost_spread, reduce_sequences, teacher_topk
from pipeline.losses.sinkhorn import SinkhornResult


def _logits(h, W, b, mm_dtype):
    z = (h.to(mm_dtype) @ W.T).float()  # (C, V) float32
    return z + b if b is not None else z


class _HiddenTopkSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ids, p, V, block, chunk_rows, need_h, need_w, need_b):
        B, N, d = h.shape
        M, k = ids.shape[1:]
        W = weight[:V]  # (V, d) padded vocabulary rows are not tokens
        b = bias[:V].float() if bias is not None else None
        mm = weight.dtype
        rows = h.reshape(-1, d)  # (B*N, d)
        lse = torch.empty(B * N, 1, device=h.device)  # (B*N, 1)
        m = torch.empty(B * N, d, device=h.device) if need_h else None  # (B*N, d) expected embedding
        for r0 in range(0, B * N, chunk_rows):
            z = _logits(rows[r0 : r0 + chunk_rows], W, b, mm)  # (C, V)
            lse[r0 : r0 + chunk_rows] = chunked_logsumexp(z)
            if need_h:
                q = z.sub_(lse[r0 : r0 + chunk_rows]).exp_()  # (C, V) in place: softmax
                m[r0 : r0 + chunk_rows] = (q.to(mm) @ W).float()
            z = q = None  # q aliases z: free the (C, V) buffer before the next chunk or the first block
        lse = lse.view(B, N, 1)
        S = h.new_empty(B, N, M, dtype=torch.float32)
        blocks = list(_blocks(ids, block))  # the distinct ids per block, reused by the backward
        for bi, j0, U, inv in blocks:
            q = (_logits(h[bi], W[U], b[U] if b is not None else None, mm) - lse[bi]).exp_()  # (N, |U|)
            S[bi, :, j0 : j0 + len(inv)] = (q[:, inv.view(-1)].view(N, -1, k) * p[bi, j0 : j0 + len(inv)]).sum(-1)
        ctx.save_for_backward(h, weight, bias, ids, p, lse, m)
        ctx.cfg = (V, block, chunk_rows, need_h, need_w, need_b)
        ctx.blocks = blocks
        return S

    @staticmethod
    def backward(ctx, dS):  # (B, N, M)
        h, weight, bias, ids, p, lse, m = ctx.saved_tensors
        V, block, chunk_rows, need_h, need_w, need_b = ctx.cfg
        B, N, d = h.shape
        W = weight[:V]
        b = bias[:V].float() if bias is not None else None
        mm = weight.dtype
        dh = torch.zeros(B, N, d, device=h.device) if need_h else None  # (B, N, d)
        dW = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V_logits, d) trainable only
        db = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        t = torch.zeros(B, N, device=h.device)  # (B, N) sum_u g_iu
        dS = dS.float()
        for bi, j0, U, inv in ctx.blocks:
            q = (_logits(h[bi], W[U], b[U] if b is not None else None, mm) - lse[bi]).exp_()  # (N, |U|)
            contrib = dS[bi, :, j0 : j0 + len(inv), None] * p[bi, None, j0 : j0 + len(inv)]  # (N, Mb, k)
            g = torch.zeros_like(q).index_add_(1, inv.view(-1), contrib.reshape(N, -1)).mul_(q)  # (N, |U|)
            t[bi] += g.sum(1)
            if need_h:
                dh[bi] += (g.to(mm) @ W[U]).float()
            if need_w:
                dW.index_add_(0, U, g.T @ h[bi].float())
            if need_b:
                db.index_add_(0, U, g.sum(0))
            q = contrib = g = None  # free this block's tensors before the next block builds its own
        if need_h:
            dh -= t[..., None] * m.view(B, N, d)
        if need_w or need_b:  # - sum_i t_i q_i(v) h_i over the whole vocabulary, recomputed chunk by chunk
            rows, tr, lr = h.reshape(-1, d), t.reshape(-1, 1), lse.reshape(-1, 1)
            for r0 in range(0, B * N, chunk_rows):
                q = _logits(rows[r0 : r0 + chunk_rows], W, b, mm).sub_(lr[r0 : r0 + chunk_rows]).exp_()
                q.mul_(tr[r0 : r0 + chunk_rows])  # (C, V)
                if need_w:
                    dW[:V].addmm_(q.T, rows[r0 : r0 + chunk_rows].float(), alpha=-1.0)
                if need_b:
                    db[:V] -= q.sum(0)
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


def _blocks(ids: torch.Tensor, block: int):
    """Per sequence b and block of teacher tokens starting at j0: (b, j0, U (|U|,) the sorted distinct ids of
    the block, inv (Mb, k) the position of each id in U)."""
    for bi in range(ids.shape[0]):
        for j0 in range(0, ids.shape[1], block):
            U, inv = torch.unique(ids[bi, j0 : j0 + block], return_inverse=True)
            yield bi, j0, U, inv


def ot_logits_loss_from_hidden(
    h: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    x_mask: torch.Tensor,
    y_mask: torch.Tensor,
    *,
    solver: OTSolver = OTSolver(),
    block: int = 64,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    score_temperature: float = 1.0,
) -> tuple[torch.Tensor, SinkhornResult]:
    """`ot_logits_loss` of the logits h W^T (+ bias), without ever building them over the vocabulary.

    h: (B, N, d) student final hidden states; weight: (V_logits, d) lm_head (tied embedding fine; its grad is
    produced only if it requires grad); teacher_ids / teacher_logprobs (B, M, k); masks (B, N), (B, M).
    vocab_size: only the first vocab_size logit columns are tokens. block: teacher tokens per block (memory
    N x block x k). chunk_rows: rows per chunk of the vocabulary pass (default `default_chunk_rows(V)`).
    Same value and gradients as `ot_logits_loss(h @ weight.T + bias, ...)` up to float32 rounding.
    """
    check_masks(x_mask, y_mask)
    V = vocab_size or weight.shape[0]
    h = torch.where(x_mask[..., None], h, 0.0)  # padding rows zeroed (where, not *: 0 * NaN = NaN)
    ids, p = teacher_topk(teacher_ids, teacher_logprobs, y_mask, V)  # (B, M, k) each, as ot_logits_loss
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (h, weight, bias)]
    S = _HiddenTopkSimilarity.apply(
        h, weight, bias, ids, p, V, block, chunk_rows or default_chunk_rows(V), *need
    )  # (B, N, M)
    C = cost_from_similarity(S, y_mask, score_temperature)
    per_seq, res = solver.loss(C, x_mask, y_mask)  # (B,)
    res = res._replace(cost_spread=cost_spread(C, x_mask, y_mask))
    return reduce_sequences(per_seq, x_mask, y_mask, reduction), res

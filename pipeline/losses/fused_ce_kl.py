"""Fused lm-head + CE + top-k KL, chunked over rows: no [rows x vocab] tensor ever exists whole.

The idea of Liger-Kernel's fused linear losses: per chunk of rows compute logits = h_c W^T, the loss, and
d loss / d logits (closed form, below) right away, turn the latter into grad_h_c = dlogits W and (only if W
trains) grad_W += dlogits^T h_c, and drop the chunk's logits. Backward then only scales the stored grads.
Peak extra memory: two (chunk_rows, V) float32 buffers (logits and their gradient; every other full-width
temporary is built 128 rows at a time), grad_h (R, d), and grad_W (V_logits, d) float32 only when the weight
requires grad (frozen lm-head under QLoRA: no V x d buffer at all). The default chunk holds 2^26 logits.

Semantics equal `w_ce * ce_loss + w_kl * topk_kl_loss` of pipeline/losses/kl.py on row-aligned inputs (row r's
logits predict targets[r]; the caller does the shift). `naive_ce_kl` is that reference path, same signature.

Gradients w.r.t. the KL's z = logits[:, :V] / tau, per row, with buckets b (the k teacher ids + the tail),
student bucket log-probs s_b, teacher t_b, q = softmax(z), g_b = dKL/ds_b:
    dKL/dz_v = (q_v / Q_b(v)) g_b(v) - q_v sum_b g_b
    forward  KL(P||Q) = sum P (t - s):     g = -P,             sum g = -1      -> dz_v = q_v - P_b q_v / Q_b
    reverse  KL(Q||P) = sum Q (s - t):     g = Q (s - t + 1),  sum g = KL + 1  -> dz_v = q_v (s_b - t_b - KL)
For a top-k slot j, q_v / Q_j = 1; for a tail token, P_T q_v / Q_T = exp(z_v - lse_rest + t_T), computed
in log space so a student tail of e^-55 never divides anything. tail="none": s is renormalised over the k
ids, only those columns get gradient, and the same formulas hold with Q the renormalised probs.
"""

import torch

from pipeline.losses.checks import check_mask, check_positive
from pipeline.losses.chunked import (
    add_chunk_grads,
    add_exp,
    ce_chunk,
    chunked_logsumexp,
    default_chunk_rows,
    grad_buffers,
    grad_needs,
    loss_parts,
    save_grads,
    scaled_grads,
    targets_and_counts,
)
from pipeline.losses.kl import LOG_FLOOR, ce_loss, topk_kl_loss


class _FusedCEKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        bias,
        targets,
        ids,
        t_lp,
        t_tail,
        kl_mask,
        w_ce,
        w_kl,
        tau,
        tail,
        reverse,
        V,
        n_ce,
        n_kl,
        chunk_rows,
        need_h,
        need_w,
        need_b,
    ):
        R, d = h.shape
        k = ids.shape[-1]
        dev = h.device
        W = weight[:V]  # (V, d) view: padded vocab rows are never multiplied, their grad stays 0
        b = bias[:V].float() if bias is not None else None
        mm_dtype = weight.dtype  # the matmul runs in W's dtype (as the model's lm_head would); no fp32 copy of W
        need_grad = need_h or need_w or need_b
        bucket = tail == "bucket" and k < V  # k covering the vocabulary: no tail, like topk_kl_loss

        grads = grad_buffers(h, weight, bias, need_h, need_w, need_b)
        ce_sum = torch.zeros((), device=dev)
        kl_sum = torch.zeros((), device=dev)
        # Per-row gradient scales; a row that does not count gets 0 (its finite garbage-free dz times 0).
        c_ce = w_ce / n_ce
        c_kl = w_kl * tau / n_kl  # d(tau^2 KL / n)/d logits = tau^2 / n * dKL/dz / tau

        for r0 in range(0, R, chunk_rows):
            hc = h[r0 : r0 + chunk_rows]  # (C, d)
            x = (hc.to(mm_dtype) @ W.T).float()  # (C, V) float32 logits: the only full-width tensors are per chunk
            if b is not None:
                x += b
            # Two (C, V) buffers live per chunk: x (logits, later overwritten) and dx (d loss / d logits). Every
            # other full-width temporary (logsumexp's, exp(x - lse)'s) is built SLICE rows at a time.
            dx = None

            if w_ce:
                nll, dx = ce_chunk(x, targets[r0 : r0 + chunk_rows], c_ce, need_grad, dx)
                ce_sum += nll

            if w_kl:
                m = kl_mask[r0 : r0 + chunk_rows]  # (C,)
                # Rows that do not count may hold anything (ids -1, log-probs -inf): make them harmless.
                idc = torch.where(m[:, None], ids[r0 : r0 + chunk_rows], torch.arange(k, device=dev))  # (C, k)
                z = x.div_(tau) if tau != 1.0 else x  # (C, V) in place: CE is done with the raw logits
                lse = chunked_logsumexp(z)  # (C, 1)
                zk = z.gather(-1, idc)  # (C, k)
                s = zk - lse  # (C, k) student log-probs at the teacher's top-k
                t = torch.where(m[:, None], t_lp[r0 : r0 + chunk_rows].float(), 0.0)  # (C, k)
                if bucket:
                    tt = torch.where(m, t_tail[r0 : r0 + chunk_rows].float(), 0.0)[:, None]  # (C, 1)
                    t = torch.cat([t, tt], -1)  # (C, k+1)
                t = (t.clamp_min(LOG_FLOOR) / tau).log_softmax(-1)  # (C, k[+1]) tempered teacher buckets
                P = t.exp()
                coef = (m.float() * c_kl)[:, None]  # (C, 1)
                if bucket:
                    # Student tail = logsumexp over the non-top-k logits, exact even when the top-k hold ~all
                    # the mass: fill the top-k with a finite minimum (exp -> 0, no inf - inf), in place.
                    z.scatter_(-1, idc, torch.finfo(z.dtype).min)
                    lse_rest = chunked_logsumexp(z)  # (C, 1)
                    s = torch.cat([s, lse_rest - lse], -1)  # (C, k+1)
                    if reverse:  # 0 log 0 = 0 for a -inf student logit, as in topk_kl_loss
                        s = s.clamp_min(torch.finfo(s.dtype).min)
                    Q = s.exp()
                    kl = ((Q * (s - t)) if reverse else (P * (t - s))).sum(-1)  # (C,)
                    if need_grad:  # tail tokens; the top-k columns hold exp(min) = 0 here, filled below
                        if reverse:
                            dx = add_exp(dx, z, lse, (s[:, k:] - t[:, k:] - kl[:, None]) * coef)
                        else:
                            dx = add_exp(dx, z, lse, coef)
                            # z is not needed any more: its last use turns it into exp(z - lse_rest + t_T)
                            dx.sub_(z.sub_(lse_rest - t[:, k:]).exp_().mul_(coef))
                else:
                    s = s.log_softmax(-1)  # renormalise over the k ids
                    if reverse:  # 0 log 0 = 0 for a -inf student logit, as in topk_kl_loss
                        s = s.clamp_min(torch.finfo(s.dtype).min)
                    Q = s.exp()
                    kl = ((Q * (s - t)) if reverse else (P * (t - s))).sum(-1)  # (C,)
                kl_sum += (kl * m).sum()
                if need_grad:  # top-k columns: g = Q - P (forward) or Q (s - t - KL) (reverse)
                    if dx is None:  # tail="none": only the k columns carry gradient
                        dx = torch.zeros_like(x)
                    gk = Q[:, :k] * (s[:, :k] - t[:, :k] - kl[:, None]) if reverse else Q[:, :k] - P[:, :k]
                    dx.scatter_add_(-1, idc, gk * coef)
            x = z = None  # z aliases x: drop both, or the next chunk's logits would coexist with these

            if dx is not None:
                add_chunk_grads(grads, dx, hc, W, r0)
            dx = None  # before the next chunk's matmul, so at most two (C, V) buffers ever live

        ce, kl = ce_sum / n_ce, tau**2 * kl_sum / n_kl
        save_grads(ctx, grads, ce, kl, h, weight, bias)
        return w_ce * ce + w_kl * kl, ce, kl

    @staticmethod
    def backward(ctx, g, _g_ce, _g_kl):
        return scaled_grads(ctx, g, "fused_ce_kl")


def fused_ce_kl(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
    *,
    w_ce: float = 1.0,
    w_kl: float = 0.0,
    temperature: float = 1.0,
    tail: str = "bucket",
    reverse: bool = False,
    vocab_size: int | None = None,
    num_items=None,
    chunk_rows: int | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """w_ce * CE + w_kl * top-k KL from hidden states, without materialising the logits.

    h: (R, d) final (post-norm) hidden states, fp32 or bf16; any leading dims are flattened with the rows.
    weight: (V_logits, d) lm-head weight (tied embedding fine); its grad is produced only if it requires grad.
    targets: (R,) long, -100 = no CE on that row. Row r's logits predict targets[r] (already shifted).
    teacher_ids / teacher_logprobs: (R, k), teacher_tail: (R,), kl_mask: (R,) bool, as in `topk_kl_loss`.
    vocab_size: only the first vocab_size logit columns are tokens (default V_logits).
    num_items: normaliser for both terms (Trainer's num_items_in_batch); default: CE by its valid-target
        count, KL by kl_mask's count, each clamped to >= 1 (all masked -> 0 with zero grads).
    chunk_rows: rows per chunk; memory ~ 2 x chunk_rows x V float32. Default `default_chunk_rows(V)`: 441 rows
        (2 x 256 MB) at V = 151,936, everything in one chunk for a small vocabulary.
    bias: optional (V_logits,) lm-head bias.
    Returns (loss, parts): loss differentiable; parts["ce"] / parts["kl"] are the unweighted, detached terms
    (KL including tau^2), present only for nonzero weights.
    """
    if tail not in ("bucket", "none"):
        raise ValueError(f"tail must be 'bucket' or 'none', got {tail!r}")
    check_positive(temperature, "temperature")
    d = h.shape[-1]
    h = h.reshape(-1, d)
    R, V = h.shape[0], vocab_size or weight.shape[0]
    if w_kl:
        if teacher_ids is None or teacher_logprobs is None or kl_mask is None:
            raise ValueError("w_kl needs teacher_ids, teacher_logprobs and kl_mask")
        if tail == "bucket" and teacher_tail is None:
            raise ValueError("tail='bucket' needs teacher_tail")
        ids = teacher_ids.reshape(R, -1).long()
        t_lp = teacher_logprobs.reshape(R, -1)
        kl_mask = check_mask(kl_mask, "kl_mask").reshape(R)
        t_tail = teacher_tail.reshape(R) if teacher_tail is not None else torch.zeros(R, device=h.device)
    else:
        ids = torch.zeros(R, 1, dtype=torch.long, device=h.device)
        t_lp, t_tail = torch.zeros(R, 1, device=h.device), torch.zeros(R, device=h.device)
        kl_mask = torch.zeros(R, dtype=torch.bool, device=h.device)
    targets, n_ce, n_kl = targets_and_counts(targets, kl_mask, w_ce, R, h.device, num_items)
    need_h, need_w, need_b = grad_needs(h, weight, bias)
    loss, ce, kl = _FusedCEKL.apply(
        h,
        weight,
        bias,
        targets,
        ids,
        t_lp,
        t_tail,
        kl_mask,
        float(w_ce),
        float(w_kl),
        float(temperature),
        tail,
        reverse,
        V,
        n_ce,
        n_kl,
        int(chunk_rows or default_chunk_rows(V)),
        need_h,
        need_w,
        need_b,
    )
    return loss, loss_parts(w_ce, w_kl, ce, kl)


def naive_ce_kl(
    h,
    weight,
    targets=None,
    teacher_ids=None,
    teacher_logprobs=None,
    teacher_tail=None,
    kl_mask=None,
    *,
    w_ce=1.0,
    w_kl=0.0,
    temperature=1.0,
    tail="bucket",
    reverse=False,
    vocab_size=None,
    num_items=None,
    chunk_rows=None,
    bias=None,
):
    """Same contract as `fused_ce_kl` through the plain losses on full (R, V_logits) logits (for comparison)."""
    d = h.shape[-1]
    logits = torch.nn.functional.linear(h.reshape(-1, d), weight, bias)  # (R, V_logits), materialised
    R = logits.shape[0]
    loss, parts = logits.new_zeros(()).float(), {}
    if w_ce:
        # ce_loss shifts (logits[t] predicts labels[t + 1]): prepend an ignored label, append a dummy row
        lab = torch.cat([targets.new_full((1,), -100), targets.reshape(R)])[None]  # (1, R+1)
        lg = torch.cat([logits, logits.new_zeros(1, logits.shape[1])])[None]  # (1, R+1, V_logits)
        parts["ce"] = ce_loss(lg, lab, num_items, vocab_size=vocab_size)
        loss = loss + w_ce * parts["ce"]
    if w_kl:
        parts["kl"] = topk_kl_loss(
            logits,
            teacher_ids.reshape(R, -1),
            teacher_logprobs.reshape(R, -1),
            None if teacher_tail is None else teacher_tail.reshape(R),
            kl_mask.reshape(R),
            temperature=temperature,
            tail=tail,
            reverse=reverse,
            vocab_size=vocab_size,
            num_items=num_items,
        )
        loss = loss + w_kl * parts["kl"]
    return loss, {k: v.detach() for k, v in parts.items()}

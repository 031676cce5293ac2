"""Fused lm-head + CE + divergence to the teacher's EXACT full-vocabulary distribution, chunked over rows.

Stage 2 can rebuild the teacher's distribution from its cached final hidden state h_t (the lm_head input, after
the final norm) and its lm_head W_t: teacher logits y = W_t h_t (+ b_t). Per chunk of rows this computes the
student logits x = W h (+ b) and y, the loss, and d loss / d x in closed form, turns the latter into grad_h and
(only if W trains) grad_W += dx^T h right away, and drops the chunk. The teacher side is a constant: no
gradient, no buffer for it (teacher_h / teacher_weight are detached). Same design as fused_ce_kl.py.

Semantics, per row counted by kl_mask, over the first V = vocab_size columns of BOTH heads (padded logits are
dropped before any softmax): p = softmax(y / tau) (teacher), q = softmax(x / tau) (student),
    forward (default)   KL(p || q)
    reverse=True        KL(q || p)
    jsd_beta in (0, 1)  beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
and the loss is w_ce * CE + w_kl * tau^2 * sum over counted rows / n (CE on the raw logits, as fused_ce_kl).
Temperature: both sides are tempered on their TRUE logits, so this is the exact tempered KL. The top-k path
(fused_ce_kl / topk_kl_loss) can only temper the teacher's cached bucket log-probs renormalised over its k+1
buckets (the tail bucket tempered as if it were one token), an approximation of this for tau != 1; at tau = 1
it is the KL between the two distributions coarse-grained to the k+1 buckets, a lower bound of this one.

Gradients w.r.t. z = x / tau (then d/dx = dz / tau; the tau^2 scale makes that tau * dz / n):
    forward  dKL/dz = q - p
    reverse  dKL/dz_v = q_v (log q_v - log p_v - KL)
    JSD      with q as free variables (dm_v/dq_v = 1 - beta) the teacher term gives -beta (1 - beta) p_v / m_v
             and the student term (1 - beta) (log(q_v / m_v) + 1 - (1 - beta) q_v / m_v); as
             beta p_v + (1 - beta) q_v = m_v, dJSD/dq_v = (1 - beta) log(q_v / m_v) =: g_v, and through the
             softmax dJSD/dz_v = q_v (g_v - sum_w q_w g_w), where sum q g = (1 - beta) KL(q || m).
log m = logaddexp(log beta + log p, log(1 - beta) + log q). Log-probs are clamped to the most negative finite
float, so a -inf logit (a banned token) contributes 0 log 0 = 0 and zero gradient instead of NaN.

Peak memory per chunk of C rows: TWO (C, V) float32 buffers, the student logits x and the teacher's, which
become the teacher log-probs and then, in place, d loss / d x (the CE part is added into the same buffer);
every other full-width temporary is SLICE rows at a time (at most 4 live for JSD, 3 otherwise, not counting
a kernel's internal scratch such as logsumexp's; tests/test_exact_kl.py measures both counts), both
matmuls included (a bf16 head never leaves a (C, V) bf16 tensor, except the (C, V) bf16 copy of the gradient
for a bf16 student's grad_h, taken after x is freed). Plus grad_h (R, d) and grad_W (V_logits, d) float32 only
when W requires grad. The same budget as fused_ce_kl, hence the same default chunk (2^26 logits per buffer).
"""

import math

import torch
import torch.nn.functional as F

from pipeline.losses import chunked  # chunked.SLICE read at call time, as chunked_logsumexp does
from pipeline.losses.checks import check_mask, check_positive
from pipeline.losses.chunked import (
    add_chunk_grads,
    ce_chunk,
    chunked_logsumexp,
    default_chunk_rows,
    grad_buffers,
    grad_needs,
    loss_parts,
    normaliser,
    save_grads,
    scaled_grads,
    targets_and_counts,
)


def _logits_into(out: torch.Tensor, h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out (C, V) float32 <- h W^T (+ b), SLICE rows at a time, the matmul in W's dtype like the model's lm_head."""
    for h_s, o_s in zip(h.split(chunked.SLICE), out.split(chunked.SLICE)):
        if W.dtype == torch.float32:
            torch.mm(h_s.float(), W.T, out=o_s)  # straight into the buffer, no temporary
        else:
            o_s.copy_(h_s.to(W.dtype) @ W.T)  # (S, V) half-precision temporary, upcast into the buffer
    if b is not None:
        out += b
    return out


def _check_divergence(reverse: bool, jsd_beta: float) -> None:
    if jsd_beta and reverse:
        raise ValueError("jsd_beta and reverse=True are exclusive (the JSD is already two-sided)")
    if jsd_beta and not 0 < jsd_beta < 1:
        raise ValueError(f"jsd_beta must be in (0, 1) (0 = plain KL), got {jsd_beta!r}")


def _divergence_(
    x: torch.Tensor,
    lp: torch.Tensor,
    m: torch.Tensor,
    coef: torch.Tensor,
    tau: float,
    reverse: bool,
    beta: float,
    need_grad: bool,
) -> torch.Tensor:
    """Sum over the rows in m of the divergence between teacher log-probs lp (C, V) and softmax(x / tau) (x: raw
    student logits, (C, V)); if need_grad, lp is overwritten in place with coef * d div / dz (coef: (C, 1)).

    Row slices hold whole rows, so each slice's divergence is complete before its gradient is written over its
    teacher log-probs: one pass, SLICE-row temporaries only. (A function, so that the slice views die with it:
    left in the caller's frame they would keep this chunk's buffers alive into the next chunk.)
    """
    S, lo = chunked.SLICE, torch.finfo(torch.float32).min
    total = torch.zeros((), device=x.device)
    for x_s, lp_s, m_s, c in zip(x.split(S), lp.split(S), m.split(S), coef.split(S)):  # (S, V), (S, V), (S,), (S, 1)
        lq = (x_s / tau) if tau != 1.0 else x_s.clone()  # (S, V) temporary
        lq.sub_(torch.logsumexp(lq, -1, keepdim=True)).clamp_min_(lo)  # student log-probs
        # in-place products: at most 4 (S, V) temporaries live (JSD), 3 otherwise
        if beta:
            lm = lp_s + math.log(beta)  # (S, V), becomes log m
            torch.logaddexp(lm, lq + math.log1p(-beta), out=lm)
            kl_p = (lp_s - lm).mul_(lp_s.exp()).sum(-1)  # (S,) KL(p || m)
            sqg = (1 - beta) * (lq - lm).mul_(lq.exp()).sum(-1)  # (S,) sum q g = (1 - beta) KL(q || m)
            div = beta * kl_p + sqg
        elif reverse:
            div = (lq - lp_s).mul_(lq.exp()).sum(-1)  # (S,)
        else:
            div = (lp_s - lq).mul_(lp_s.exp()).sum(-1)  # (S,)
        total += torch.where(m_s, div, 0.0).sum()
        if not need_grad:
            continue
        if beta:  # q (g - sum q g)
            torch.sub(lq, lm, out=lp_s).mul_(1 - beta).sub_(sqg[:, None])
            lp_s.mul_(lq.exp_()).mul_(c)
        elif reverse:  # q (log q - log p - KL)
            torch.sub(lq, lp_s, out=lp_s).sub_(div[:, None]).mul_(lq.exp_()).mul_(c)
        else:  # q - p
            torch.sub(lq.exp_(), lp_s.exp_(), out=lp_s).mul_(c)
    return total


class _FusedCEExactKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        bias,
        targets,
        t_h,
        t_w,
        t_b,
        kl_mask,
        w_ce,
        w_kl,
        tau,
        reverse,
        beta,
        V,
        n_ce,
        n_kl,
        chunk_rows,
        need_h,
        need_w,
        need_b,
    ):
        R, d = h.shape
        dev = h.device
        W, Wt = weight[:V], t_w[:V]  # (V, d), (V, D) views: padded vocab rows are never multiplied
        b = bias[:V].float() if bias is not None else None
        bt = t_b[:V].float() if t_b is not None else None
        need_grad = need_h or need_w or need_b
        lo = torch.finfo(torch.float32).min  # log-prob floor: exp(lo) = 0, and 0 * (finite) = 0, never NaN

        grads = grad_buffers(h, weight, bias, need_h, need_w, need_b)
        ce_sum = torch.zeros((), device=dev)
        kl_sum = torch.zeros((), device=dev)
        c_ce = w_ce / n_ce
        c_kl = w_kl * tau / n_kl  # d(tau^2 div / n)/dx = tau^2 / n * d div/dz / tau

        for r0 in range(0, R, chunk_rows):
            hc = h[r0 : r0 + chunk_rows]  # (C, d)
            C = hc.shape[0]
            x = _logits_into(torch.empty(C, V, device=dev), hc, W, b)  # (C, V) student logits, buffer 1 of 2
            dx = None

            if w_kl:
                m = kl_mask[r0 : r0 + chunk_rows]  # (C,)
                # Rows that do not count may hold anything (NaN): zero them before the matmul, so their teacher
                # logits are the bias alone, finite; their coefficient below is 0.
                th = torch.where(m[:, None], t_h[r0 : r0 + chunk_rows], 0.0)  # (C, D)
                lp = _logits_into(torch.empty(C, V, device=dev), th, Wt, bt)  # (C, V) buffer 2 of 2
                if tau != 1.0:
                    lp.div_(tau)
                lp.sub_(chunked_logsumexp(lp)).clamp_min_(lo)  # (C, V) teacher log-probs, in place
                coef = (m.float() * c_kl)[:, None]  # (C, 1)
                kl_sum += _divergence_(x, lp, m, coef, tau, reverse, beta, need_grad)
                dx = lp if need_grad else None
                lp = None

            if w_ce:  # CE gradient added into the divergence's buffer (or a new one without the divergence)
                nll, dx = ce_chunk(x, targets[r0 : r0 + chunk_rows], c_ce, need_grad, dx)
                ce_sum += nll
            x = None  # before dx's bf16 copy and the next chunk's logits: at most two (C, V) buffers live

            if dx is not None:
                add_chunk_grads(grads, dx, hc, W, r0)
            dx = None

        ce, kl = ce_sum / n_ce, tau**2 * kl_sum / n_kl
        save_grads(ctx, grads, ce, kl, h, weight, bias)
        return w_ce * ce + w_kl * kl, ce, kl

    @staticmethod
    def backward(ctx, g, _g_ce, _g_kl):
        return scaled_grads(ctx, g, "fused_ce_exact_kl")


def fused_ce_exact_kl(
    h: torch.Tensor,
    weight: torch.Tensor,
    teacher_h: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    targets: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
    *,
    w_ce: float = 1.0,
    w_kl: float = 1.0,
    temperature: float = 1.0,
    reverse: bool = False,
    jsd_beta: float = 0.0,
    vocab_size: int | None = None,
    num_items=None,
    chunk_rows: int | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """w_ce * CE + w_kl * exact full-vocabulary divergence, from hidden states, without any (R, V) tensor.

    h: (R, d) student final hidden states, fp32 or bf16 (leading dims flattened); weight: (V_s_logits, d)
        student lm-head, its grad produced only if it requires grad; bias: optional (V_s_logits,).
    teacher_h: (R, D) teacher final hidden states (D may differ from d); teacher_weight: (V_t_logits, D) in
        any dtype (the teacher matmul runs in it, then float32); teacher_bias: optional (V_t_logits,). All
        constants: never any gradient. May be None when w_kl == 0.
    targets: (R,) long, -100 = no CE on that row (already shifted). kl_mask: (R,) bool, rows that count for
        the divergence; teacher_h of the other rows may hold garbage, NaN included.
    reverse / jsd_beta: see the module docstring (exclusive). temperature tau divides both sides' logits;
        the divergence is scaled by tau^2.
    vocab_size V: only the first V columns of both heads are tokens (default V_s_logits); must fit both.
    num_items: normaliser for both terms (Trainer's num_items_in_batch); default CE by its valid targets,
        the divergence by kl_mask's count, each >= 1 (all masked -> 0 with zero grads).
    chunk_rows: rows per chunk; memory ~ 2 x chunk_rows x V float32 (default `default_chunk_rows(V)`).
    Returns (loss, parts): parts["ce"] / parts["kl"] are the unweighted detached terms ("kl" is the selected
    divergence, tau^2 included), present only for nonzero weights.
    """
    check_positive(temperature, "temperature")
    _check_divergence(reverse, jsd_beta)
    d = h.shape[-1]
    h = h.reshape(-1, d)
    R, V = h.shape[0], vocab_size or weight.shape[0]
    if V > weight.shape[0]:
        raise ValueError(f"vocab_size {V} exceeds the student head's {weight.shape[0]} logits")
    if w_kl:
        if teacher_h is None or teacher_weight is None or kl_mask is None:
            raise ValueError("w_kl needs teacher_h, teacher_weight and kl_mask")
        if V > teacher_weight.shape[0]:
            raise ValueError(f"vocab_size {V} exceeds the teacher head's {teacher_weight.shape[0]} logits")
        kl_mask = check_mask(kl_mask, "kl_mask").reshape(R)
        t_h = teacher_h.detach().reshape(R, -1)
        t_w = teacher_weight.detach()
        t_b = teacher_bias.detach() if teacher_bias is not None else None
    else:  # placeholders, never read
        kl_mask = torch.zeros(R, dtype=torch.bool, device=h.device)
        t_h, t_w, t_b = torch.zeros(R, 1, device=h.device), torch.zeros(V, 1, device=h.device), None
    targets, n_ce, n_kl = targets_and_counts(targets, kl_mask, w_ce, R, h.device, num_items)
    need_h, need_w, need_b = grad_needs(h, weight, bias)
    loss, ce, kl = _FusedCEExactKL.apply(
        h,
        weight,
        bias,
        targets,
        t_h,
        t_w,
        t_b,
        kl_mask,
        float(w_ce),
        float(w_kl),
        float(temperature),
        bool(reverse),
        float(jsd_beta),
        V,
        n_ce,
        n_kl,
        int(chunk_rows or default_chunk_rows(V)),
        need_h,
        need_w,
        need_b,
    )
    return loss, loss_parts(w_ce, w_kl, ce, kl)


def naive_ce_exact_kl(
    h,
    weight,
    teacher_h,
    teacher_weight,
    targets=None,
    kl_mask=None,
    *,
    w_ce=1.0,
    w_kl=1.0,
    temperature=1.0,
    reverse=False,
    jsd_beta=0.0,
    vocab_size=None,
    num_items=None,
    chunk_rows=None,
    bias=None,
    teacher_bias=None,
):
    """Same contract as `fused_ce_exact_kl` on plain full (R, V) logits (autograd; for comparison)."""
    check_positive(temperature, "temperature")
    _check_divergence(reverse, jsd_beta)
    d = h.shape[-1]
    V = vocab_size or weight.shape[0]
    x = F.linear(h.reshape(-1, d), weight, bias)[:, :V]  # (R, V), materialised
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    R, tau = x.shape[0], temperature
    loss, parts = x.new_zeros(()), {}
    if w_ce:
        nll = F.cross_entropy(x, targets.reshape(R), ignore_index=-100, reduction="sum")
        parts["ce"] = nll / normaliser(num_items, (targets != -100).sum()).to(x.dtype)
        loss = loss + w_ce * parts["ce"]
    if w_kl:
        m = check_mask(kl_mask, "kl_mask").reshape(R)
        Wt = teacher_weight.detach()
        y = (teacher_h.detach().reshape(R, -1)[m].to(Wt.dtype) @ Wt[:V].T).to(x.dtype)  # (R', V)
        if teacher_bias is not None:
            y = y + teacher_bias.detach()[:V].to(x.dtype)
        lo = torch.finfo(x.dtype).min
        lp = (y / tau).log_softmax(-1).clamp_min(lo)  # (R', V)
        lq = (x[m] / tau).log_softmax(-1).clamp_min(lo)  # (R', V)
        if jsd_beta:
            lm = torch.logaddexp(lp + math.log(jsd_beta), lq + math.log1p(-jsd_beta))
            div = jsd_beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - jsd_beta) * (lq.exp() * (lq - lm)).sum(-1)
        elif reverse:
            div = (lq.exp() * (lq - lp)).sum(-1)
        else:
            div = (lp.exp() * (lp - lq)).sum(-1)
        parts["kl"] = tau**2 * div.sum() / normaliser(num_items, m.sum()).to(x.dtype)
        loss = loss + w_kl * parts["kl"]
    return loss, {k: v.detach() for k, v in parts.items()}

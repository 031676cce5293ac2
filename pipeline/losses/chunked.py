"""Row-chunking machinery shared by the fused lm-head losses (fused_ce_kl.py, exact_kl.py; the chunk sizes also
by crosstok.py, fused_ot.py and chunk.py): such a loss walks the rows in chunks, builds each chunk's (C, V) float32
logits, computes the loss and d loss / d logits right away and folds the latter into float32 gradient buffers for
h, the head's weight and bias, so that no (rows, V) tensor ever exists and backward only scales the stored
gradients. Here: the chunk sizes (CHUNK_ELEMS logits per (C, V) buffer; SLICE rows per full-width temporary inside
a chunk, read at call time so tests can shrink it), the SLICE-wise logsumexp and exp, the hard-label CE of a chunk,
the loss normalisers, and the gradient buffers with the backward that scales them. Imports only torch.
"""

import torch

SLICE = 128  # rows per full-width temporary inside a chunk (logsumexp, exp): 128 x V floats, not chunk x V
CHUNK_ELEMS = 2**26  # default chunk = this many logits (256 MB float32): ~441 rows at V = 151,936


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one (rows, V) float32 buffer holds CHUNK_ELEMS elements (two such buffers live)."""
    return max(SLICE, CHUNK_ELEMS // vocab)


def chunked_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """(C, V) -> (C, 1) logsumexp, SLICE rows at a time (torch.logsumexp allocates a full (C, V) temporary)."""
    return torch.cat([torch.logsumexp(xs, -1, keepdim=True) for xs in x.split(SLICE)])


def add_exp(dst: torch.Tensor | None, x: torch.Tensor, shift: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """dst += exp(x - shift) * coef, row slices at a time; dst None -> a new buffer. shift, coef: (C, 1)."""
    if dst is None:
        dst = torch.empty_like(x)
        for d_s, x_s, sh, c in zip(dst.split(SLICE), x.split(SLICE), shift.split(SLICE), coef.split(SLICE)):
            torch.sub(x_s, sh, out=d_s).exp_().mul_(c)
        return dst
    for d_s, x_s, sh, c in zip(dst.split(SLICE), x.split(SLICE), shift.split(SLICE), coef.split(SLICE)):
        d_s.add_((x_s - sh).exp_().mul_(c))
    return dst


def ce_chunk(
    x: torch.Tensor, tgt: torch.Tensor, c_ce: float, need_grad: bool, dx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hard-label CE of one chunk of raw logits x (C, V), targets tgt (C,) with -100 = no CE.

    Returns (sum of the valid rows' NLL, dx) with dx += c_ce * (softmax(x) - onehot(tgt)) on the valid rows when
    need_grad (dx None -> a new (C, V) buffer; else updated in place), dx unchanged otherwise. x is not modified.
    """
    valid = tgt != -100
    tg = torch.where(valid, tgt, 0)[:, None]  # (C, 1)
    lse = chunked_logsumexp(x)  # (C, 1)
    nll = ((lse - x.gather(-1, tg))[:, 0] * valid).sum()
    if need_grad:
        coef = (valid.float() * c_ce)[:, None]  # (C, 1)
        dx = add_exp(dx, x, lse, coef)  # softmax - onehot, scaled
        dx.scatter_add_(-1, tg, -coef)
    return nll, dx


def normaliser(n, default: torch.Tensor) -> torch.Tensor:
    """A loss's divisor as a float tensor on default's device: n (num_items) if given, else default (a row
    count), clamped to >= 1 so that an all-masked batch gives 0, not NaN."""
    n = default if n is None else n
    return torch.as_tensor(n, device=default.device).clamp_min(1).float()


def targets_and_counts(targets, kl_mask: torch.Tensor, w_ce: float, R: int, device, num_items):
    """(R,) CE targets (all -100 when w_ce is 0) and the CE and KL normalisers (num_items, or the counts)."""
    if w_ce:
        if targets is None:
            raise ValueError("w_ce needs targets")
        targets = targets.reshape(R).long()
    else:
        targets = torch.full((R,), -100, dtype=torch.long, device=device)
    return targets, normaliser(num_items, (targets != -100).sum()), normaliser(num_items, kl_mask.sum())


def grad_needs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, bool, bool]:
    """Which of h, the head's weight and bias get a gradient (none under no_grad; a frozen head gets no buffer)."""
    on = torch.is_grad_enabled()
    return on and h.requires_grad, on and weight.requires_grad, on and bias is not None and bias.requires_grad


def loss_parts(w_ce: float, w_kl: float, ce: torch.Tensor, kl: torch.Tensor) -> dict:
    """The unweighted, detached terms of the nonzero weights, for logging."""
    return {name: v.detach() for name, w, v in (("ce", w_ce, ce), ("kl", w_kl, kl)) if w}


def grad_buffers(h, weight, bias, need_h: bool, need_w: bool, need_b: bool) -> list:
    """float32 gradient accumulators of the fused losses: h (R, d), and W (V_logits, d) / bias (V_logits,) only
    when they train (a frozen lm-head under QLoRA: no V x d buffer at all)."""
    return [
        torch.zeros(h.shape, device=h.device, dtype=torch.float32) if need_h else None,
        torch.zeros_like(weight, dtype=torch.float32) if need_w else None,
        torch.zeros_like(bias, dtype=torch.float32) if need_b else None,
    ]


def add_chunk_grads(grads: list, dx: torch.Tensor, hc: torch.Tensor, W: torch.Tensor, r0: int) -> None:
    """A chunk's d loss / d logits dx (C, V) into the accumulators (W: the head's first V rows)."""
    grad_h, grad_w, grad_b = grads
    V = W.shape[0]
    if grad_h is not None:
        grad_h[r0 : r0 + len(hc)] = (dx.to(W.dtype) @ W).float()  # (C, d), the matmul in W's dtype
    if grad_w is not None:
        grad_w[:V].addmm_(dx.T, hc.float())  # (V, d) += (V, C) @ (C, d), in float32
    if grad_b is not None:
        grad_b[:V] += dx.sum(0)


def save_grads(ctx, grads: list, ce: torch.Tensor, kl: torch.Tensor, h, weight, bias) -> None:
    """Keep the finished gradients for `scaled_grads`; the logged parts get none."""
    ctx.mark_non_differentiable(ce, kl)  # logged parts only: backward holds one combined gradient
    ctx.save_for_backward(*grads)
    ctx.done = False
    ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)


def scaled_grads(ctx, g: torch.Tensor, name: str) -> tuple:
    """The backward of a fused loss: its stored gradients times the upstream g, scaled in place (so no second
    V x d buffer exists); hence once per forward.

    The forward's first three inputs must be h, weight, bias (the order of `grad_buffers`); every later input gets
    None. How many inputs there are is read from ctx.needs_input_grad (one entry per forward input), not written
    down here, so a loss that gains or loses an argument cannot shift the padding. The buffers that exist must also
    be those of the first three inputs that need a gradient: an argument inserted before bias shows up there as a
    mismatch and fails loudly rather than sending a gradient to the wrong input.
    """
    if ctx.done:
        raise RuntimeError(
            f"{name}: backward runs once per forward (its stored gradients are scaled in place so "
            "no second V x d buffer exists); recompute the loss instead of retain_graph=True"
        )
    ctx.done = True
    n_inputs = len(ctx.needs_input_grad)
    stored = tuple(x is not None for x in ctx.saved_tensors)
    if n_inputs < len(stored) or stored != tuple(ctx.needs_input_grad[: len(stored)]):
        raise RuntimeError(
            f"{name}: the forward's first inputs must be h, weight, bias with their gradient buffers; inputs needing "
            f"a gradient {ctx.needs_input_grad[: len(stored)]}, buffers {stored}"
        )
    grads = [None if x is None else x.mul_(g).to(dt) for x, dt in zip(ctx.saved_tensors, ctx.dtypes)]
    return (*grads, *[None] * (n_inputs - len(grads)))

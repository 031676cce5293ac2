"""Fused chunked lm-head + CE + top-k KL against the plain losses on full logits, run in float64 (the
reference), on awkward shapes: R=41 rows, d=13, 401 logit columns of which 389 are tokens, k=7."""

import copy
import math

import pytest
import torch

from pipeline.losses.fused_ce_kl import fused_ce_kl, naive_ce_kl
from tests.conftest import NewAllocations, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

R, D, VL, V, K = 41, 13, 401, 389, 7


def make(seed=0):
    """h, W (padding rows huge: they would dominate if not dropped), targets, teacher top-k view, mask."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, D, generator=g)
    W = 0.6 * torch.randn(VL, D, generator=g)
    W[V:] *= 50
    targets = torch.randint(0, V, (R,), generator=g)
    targets[torch.rand(R, generator=g) < 0.3] = -100
    lp = (3 * torch.randn(R, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    t_lp, ids = lp.topk(K, dim=-1)
    tail = lp.scatter(-1, ids, -math.inf).logsumexp(-1).clamp_min(-80.0)
    mask = torch.rand(R, generator=g) < 0.8
    mask[0] = False
    t_lp = t_lp.float()
    t_lp[~mask] = -math.inf  # garbage in rows that do not count must not leak
    ids[~mask] = -1
    return h, W, targets, ids, t_lp, tail.float(), mask


def run(fn, h, W, *args, bias=None, **kw):
    """Loss, parts and grads of 3 * loss (a non-unit upstream gradient) for h, W and bias."""
    h = h.clone().requires_grad_()
    W = W.clone().requires_grad_(kw.pop("train_w", True))
    b = bias.clone().requires_grad_() if bias is not None else None
    loss, parts = fn(h, W, *args, bias=b, **kw)
    (3 * loss).backward()
    return loss, parts, h.grad, W.grad, b.grad if b is not None else None


def compare(kw, *, seed=0, bias=False, data=None):
    h, W, *rest = data or make(seed)
    b = torch.randn(VL, dtype=torch.float64) if bias else None
    loss, parts, gh, gw, gb = run(fused_ce_kl, h, W, *rest, bias=None if b is None else b.float(), **kw)
    kw64 = {k: v for k, v in kw.items() if k != "chunk_rows"}
    ref, rparts, rh, rw, rb = run(naive_ce_kl, h.double(), W.double(), *rest, bias=b, **kw64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert parts.keys() == rparts.keys()
    for k in parts:
        torch.testing.assert_close(parts[k].double(), rparts[k], rtol=1e-5, atol=1e-7)
    assert rel_err(gh, rh) < 1e-5 and rel_err(gw, rw) < 1e-5
    if kw.get("vocab_size"):
        assert (gw[V:] == 0).all()  # padded vocab rows are not tokens
    if bias:
        assert rel_err(gb, rb) < 1e-5
    return loss, gh, gw


BASE = dict(w_ce=0.7, w_kl=1.3, vocab_size=V, chunk_rows=7)


@pytest.mark.parametrize("tail", ["bucket", "none"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_naive(tail, reverse, tau):
    compare(dict(BASE, tail=tail, reverse=reverse, temperature=tau))


@pytest.mark.parametrize("kw", [dict(num_items=123), dict(w_kl=0.0), dict(w_ce=0.0), dict(vocab_size=None)])
def test_options_match_naive(kw):
    compare(dict(BASE, **kw), bias=True)


def test_chunk_sizes_agree():
    outs = [compare(dict(BASE, temperature=2.0, chunk_rows=c)) for c in (1, 7, 41, 1000)]
    for loss, gh, gw in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gh, outs[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gw, outs[0][2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reverse", [False, True])
def test_peaked_student_tail_stays_exact(reverse):
    # 7 fixed tokens get +60 through the bias: the student's non-top-k mass is ~e^-55, where log(1 - sum q)
    # would cancel to log(0) in float32; the teacher tail sits at the cache floor
    h, W, targets, ids, t_lp, tail, mask = make(1)
    top = torch.arange(0, 7 * 50, 50)
    ids = top.expand(R, K).clone()
    t_lp = torch.linspace(-0.5, -4, K).log_softmax(-1).expand(R, K).clone()
    tail = torch.full((R,), -80.0)
    bias = torch.zeros(VL, dtype=torch.float64)
    bias[top] = 60.0
    kw = dict(BASE, reverse=reverse)
    loss, parts, gh, gw, gb = run(fused_ce_kl, h, W, targets, ids, t_lp, tail, mask, bias=bias.float(), **kw)
    assert all(torch.isfinite(x).all() for x in (loss, gh, gw, gb))
    kw.pop("chunk_rows")
    ref, _, rh, rw, rb = run(naive_ce_kl, h.double(), W.double(), targets, ids, t_lp, tail, mask, bias=bias, **kw)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert rel_err(gh, rh) < 1e-4 and rel_err(gw, rw) < 1e-4 and rel_err(gb, rb) < 1e-4


@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_all_masked_is_zero(tail):
    h, W, targets, ids, t_lp, t_tail, mask = make()
    targets[:] = -100
    loss, parts, gh, gw, _ = run(
        fused_ce_kl,
        h,
        W,
        targets,
        ids,
        t_lp,
        t_tail,
        torch.zeros_like(mask),
        **dict(BASE, tail=tail, reverse=True, temperature=2.0),
    )
    assert loss.item() == 0 and parts["ce"].item() == 0 and parts["kl"].item() == 0
    assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("train_w", [False, True])
def test_no_full_logits_and_no_weight_grad_buffer_when_frozen(train_w):
    # chunk 7 < d = 13 < R = 41: a chunk's (7, V) tensors are smaller than W (401 x 13), while the full (41, V)
    # logits and any (V, d) buffer are not, so "every allocation < VL * D elements" rules out both
    h, W, *rest = make()
    h.requires_grad_(), W.requires_grad_(train_w)
    with NewAllocations() as mode:
        loss, _ = fused_ce_kl(h, W, *rest, **BASE)
        (3 * loss).backward()
    big = [s for s in mode.shapes if math.prod(s) >= VL * D]
    if train_w:
        assert big == [(VL, D)] and W.grad is not None  # positive control: exactly the one grad accumulator
    else:
        assert big == [] and W.grad is None
    assert h.grad is not None and torch.isfinite(loss)


def test_backward_twice_is_refused():
    h, W, *rest = make()
    loss, _ = fused_ce_kl(h.requires_grad_(), W, *rest, **BASE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_no_grad_allocates_no_gradients():
    h, W, *rest = make()
    with torch.no_grad(), NewAllocations() as mode:
        loss, _ = fused_ce_kl(h.requires_grad_(), W.requires_grad_(), *rest, **BASE)
    assert not any(s in ((R, D), (VL, D)) for s in mode.shapes)
    torch.testing.assert_close(
        loss.double(), naive_ce_kl(h.double(), W.double(), *rest, **BASE)[0].detach(), rtol=1e-5, atol=1e-7
    )


def test_bf16_frozen_head():
    # QLoRA-like: bf16 hidden states, frozen bf16 lm-head; logits are computed in bf16 (as the model's lm_head
    # would) and upcast, so the reference is the naive path on the same bf16 values with bf16-level tolerance
    h, W, *rest = make()
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16()
    loss, parts = fused_ce_kl(hb, Wb, *rest, **BASE)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad is None
    ref, _, rh, _, _ = run(
        naive_ce_kl,
        hb.detach().double(),
        Wb.double(),
        *rest,
        train_w=False,
        **{k: v for k, v in BASE.items() if k != "chunk_rows"},
    )
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=1e-3)
    assert rel_err(hb.grad.float() * 3, rh) < 3e-2


class Tiny(torch.nn.Module):
    """Embedding -> block -> norm -> lm_head tied to the embedding (as Qwen2.5-1.5B ties them)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VL, D)
        self.block = torch.nn.Linear(D, D)
        self.norm = torch.nn.LayerNorm(D)
        self.lm_head = torch.nn.Linear(D, VL, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        return self.norm(x + torch.tanh(self.block(x)))  # (R, D) final hidden states


def test_tied_embedding_gradients():
    torch.manual_seed(0)
    _, _, targets, ids, t_lp, tail, mask = make()
    model = Tiny()
    ref_model = copy.deepcopy(model).double()
    assert ref_model.lm_head.weight is ref_model.embed.weight
    inp = torch.randint(0, V, (R,))
    kw = dict(BASE, temperature=2.0)
    loss, _ = fused_ce_kl(model(inp), model.lm_head.weight, targets, ids, t_lp, tail, mask, **kw)
    loss.backward()
    kw.pop("chunk_rows")
    ref, _ = naive_ce_kl(ref_model(inp), ref_model.lm_head.weight, targets, ids, t_lp, tail, mask, **kw)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    for (name, p), p64 in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.grad, p64.grad) < 1e-5, name
    # the tied weight's grad has both parts: the lm-head's and the embedding lookup's rows
    assert (model.embed.weight.grad[inp] != 0).any() and (model.embed.weight.grad[V:] == 0).all()


@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_reverse_kl_with_minus_inf_logit(tail):
    # a -inf bias (a banned token) at columns that are teacher top-k ids: the student bucket has probability
    # 0 and adds 0 log 0 = 0 to KL(student || teacher); the reference is the float64 naive path with -1e4
    # instead of -inf (exp(-1e4 - lse) = 0 exactly in float64), so it needs no 0 log 0 convention
    h, W, targets, ids, t_lp, tail_lp, mask = make(2)
    banned = ids[mask][:3, 0].unique()  # the teacher's top token of some counted rows
    targets[torch.isin(targets, banned)] = -100  # CE of a banned target would be +inf, rightly
    b = torch.zeros(VL, dtype=torch.float64)
    b[banned] = -math.inf
    kw = dict(BASE, tail=tail, reverse=True, temperature=2.0)
    loss, parts, gh, gw, gb = run(fused_ce_kl, h, W, targets, ids, t_lp, tail_lp, mask, bias=b.float(), **kw)
    assert all(torch.isfinite(x).all() for x in (loss, gh, gw, gb))
    kw.pop("chunk_rows")
    ref, rparts, rh, rw, rb = run(
        naive_ce_kl, h.double(), W.double(), targets, ids, t_lp, tail_lp, mask, bias=b.clamp_min(-1e4), **kw
    )
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["kl"].double(), rparts["kl"], rtol=1e-5, atol=1e-7)
    assert rel_err(gh, rh) < 1e-5 and rel_err(gw, rw) < 1e-5 and rel_err(gb, rb) < 1e-5
    assert (gb[banned] == 0).all()


def test_refuses_integer_mask_and_nonpositive_temperature():
    h, W, targets, ids, t_lp, tail, mask = make()
    with pytest.raises(TypeError, match="kl_mask must be a bool tensor"):
        fused_ce_kl(h, W, targets, ids, t_lp, tail, mask.long(), **BASE)
    for tau in (0.0, -2.0, math.nan):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fused_ce_kl(h, W, targets, ids, t_lp, tail, mask, **dict(BASE, temperature=tau))

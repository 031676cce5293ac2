"""Fused chunked lm-head + CE + exact full-vocabulary KL / reverse KL / JSD against a float64 autograd reference
on full logits, written here, on awkward shapes: R=41 rows, student d=13 with 401 logit columns, teacher D=17
with 397 columns, of which the first 389 are tokens on both sides."""

import math

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.losses import chunked
from pipeline.losses.exact_kl import fused_ce_exact_kl, naive_ce_exact_kl
from tests.conftest import NewAllocations, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

R, D, DT, VS, VT, V = 41, 13, 17, 401, 397, 389
MODES = {"forward": {}, "reverse": dict(reverse=True), "jsd0.1": dict(jsd_beta=0.1), "jsd0.5": dict(jsd_beta=0.5)}


def make(seed=0):
    """Student h, W; teacher h_t, W_t (padding rows of both heads huge: they would dominate if not dropped);
    targets with -100s; kl_mask, with NaN teacher states in the rows it excludes."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, D, generator=g)
    W = 0.6 * torch.randn(VS, D, generator=g)
    W[V:] *= 50
    th = torch.randn(R, DT, generator=g)
    Wt = 0.5 * torch.randn(VT, DT, generator=g)
    Wt[V:] *= 50
    targets = torch.randint(0, V, (R,), generator=g)
    targets[torch.rand(R, generator=g) < 0.3] = -100
    mask = torch.rand(R, generator=g) < 0.8
    mask[0] = False
    th[~mask] = math.nan  # garbage in rows that do not count must not leak
    return h, W, th, Wt, targets, mask


def reference(
    h,
    W,
    y,
    targets,
    mask,
    *,
    bias=None,
    w_ce=1.0,
    w_kl=1.0,
    temperature=1.0,
    reverse=False,
    jsd_beta=0.0,
    vocab_size=V,
    num_items=None,
):
    """Float64 autograd on full logits; y: the teacher's full logits (R, VT), a constant."""
    x = (h @ W.T + (0 if bias is None else bias))[:, :vocab_size]  # (R, V)
    valid = targets != -100
    tg = torch.where(valid, targets, 0)[:, None]
    nll = (x.logsumexp(-1) - x.gather(-1, tg)[:, 0])[valid].sum()
    ce = nll / max(valid.sum().item() if num_items is None else num_items, 1)
    tau = temperature
    lp = (y[mask, :vocab_size] / tau).log_softmax(-1)  # (R', V)
    lq = (x[mask] / tau).log_softmax(-1)
    if jsd_beta:
        lm = torch.logaddexp(lp + math.log(jsd_beta), lq + math.log(1 - jsd_beta))  # log(beta p + (1-beta) q)
        div = jsd_beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - jsd_beta) * (lq.exp() * (lq - lm)).sum(-1)
    elif reverse:
        div = (lq.exp() * (lq - lp)).sum(-1)
    else:
        div = (lp.exp() * (lp - lq)).sum(-1)
    kl = tau**2 * div.sum() / max(mask.sum().item() if num_items is None else num_items, 1)
    return w_ce * ce + w_kl * kl, {"ce": ce.detach(), "kl": kl.detach()}


def teacher_logits(th, Wt, tb=None):
    """What the teacher's own lm_head gives, in its dtype, as float64."""
    y = (th.to(Wt.dtype) @ Wt.T).double()
    return y if tb is None else y + tb.double()


def run(fn, h, W, *args, bias=None, train_w=True, **kw):
    """Loss, parts and grads of 3 * loss (a non-unit upstream gradient) for h, W and bias."""
    h = h.clone().requires_grad_()
    W = W.clone().requires_grad_(train_w)
    b = bias.clone().requires_grad_() if bias is not None else None
    loss, parts = fn(h, W, *args, bias=b, **kw)
    (3 * loss).backward()
    return loss, parts, h.grad, W.grad, b.grad if b is not None else None


def compare(kw, *, seed=0, bias=False, data=None, tol=1e-5):
    h, W, th, Wt, targets, mask = data or make(seed)
    g = torch.Generator().manual_seed(seed + 100)
    b, tb = (torch.randn(VS, generator=g), torch.randn(VT, generator=g)) if bias else (None, None)
    loss, parts, gh, gw, gb = run(fused_ce_exact_kl, h, W, th, Wt, targets, mask, bias=b, teacher_bias=tb, **kw)
    kw64 = {k: v for k, v in kw.items() if k in ("w_ce", "w_kl", "temperature", "reverse", "jsd_beta", "num_items")}
    ref, rparts, rh, rw, rb = run(
        reference,
        h.double(),
        W.double(),
        teacher_logits(th, Wt, tb),
        targets,
        mask,
        bias=None if b is None else b.double(),
        **kw64,
    )
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=1e-7)
    assert parts.keys() == {k for k in ("ce", "kl") if kw.get(f"w_{k}", 1.0)}
    for k in parts:
        torch.testing.assert_close(parts[k].double(), rparts[k], rtol=tol, atol=1e-7)
    assert rel_err(gh, rh) < tol and rel_err(gw, rw) < tol
    assert (gw[V:] == 0).all()  # padded vocab rows are not tokens
    if bias:
        assert rel_err(gb, rb) < tol and (gb[V:] == 0).all()
    return loss, gh, gw


BASE = dict(w_ce=0.7, w_kl=1.3, vocab_size=V, chunk_rows=7)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, tau, bias):
    compare(dict(BASE, temperature=tau, **MODES[mode]), bias=bias)


@pytest.mark.parametrize("kw", [dict(num_items=123), dict(w_kl=0.0), dict(w_ce=0.0), dict(chunk_rows=None)])
def test_options_match_reference(kw):
    compare(dict(BASE, jsd_beta=0.3, temperature=1.5, **kw), bias=True)


def test_chunk_sizes_agree():
    outs = [compare(dict(BASE, jsd_beta=0.5, temperature=2.0, chunk_rows=c), bias=True) for c in (1, 7, 41, 1000)]
    for loss, gh, gw in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gh, outs[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gw, outs[0][2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd0.5"])
def test_naive_matches_reference(mode):
    h, W, th, Wt, targets, mask = make(3)
    kw = dict(BASE, temperature=2.0, **MODES[mode])
    loss, parts, gh, gw, _ = run(naive_ce_exact_kl, h.double(), W.double(), th, Wt.double(), targets, mask, **kw)
    ref, rparts, rh, rw, _ = run(
        reference,
        h.double(),
        W.double(),
        teacher_logits(th, Wt.double()),
        targets,
        mask,
        **{k: v for k, v in kw.items() if k != "chunk_rows"},
    )
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    assert rel_err(gh, rh) < 1e-10 and rel_err(gw, rw) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_is_zero(mode):
    h, W, th, Wt, targets, mask = make()
    targets[:] = -100
    th[:] = math.nan
    loss, parts, gh, gw, _ = run(
        fused_ce_exact_kl, h, W, th, Wt, targets, torch.zeros_like(mask), **dict(BASE, temperature=2.0, **MODES[mode])
    )
    assert loss.item() == 0 and parts["ce"].item() == 0 and parts["kl"].item() == 0
    assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("mode", MODES)
def test_teacher_equal_to_student_gives_zero(mode, tau):
    h, W, _, _, targets, mask = make()
    loss, parts, gh, gw, _ = run(
        fused_ce_exact_kl, h, W, h, W, targets, mask, **dict(BASE, w_ce=0.0, temperature=tau, **MODES[mode])
    )
    assert abs(parts["kl"].item()) < 1e-6
    assert gh.abs().max() < 1e-6 and gw.abs().max() < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_divergence_nonnegative_and_jsd_bounded(mode):
    for seed in range(4):
        h, W, th, Wt, targets, mask = make(seed)
        for tau in (0.5, 1.0, 3.0):
            with torch.no_grad():
                _, parts = fused_ce_exact_kl(
                    3 * h, W, th, Wt, targets, mask, **dict(BASE, temperature=tau, **MODES[mode])
                )
            assert parts["kl"] >= 0
            if beta := MODES[mode].get("jsd_beta"):  # generalised JSD <= H(beta): reached for disjoint supports
                assert parts["kl"] <= tau**2 * -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))


@pytest.mark.parametrize("mode", MODES)
def test_banned_tokens(mode):
    # -inf biases: columns banned on both sides (0 log 0 on both), and for reverse / JSD columns banned by the
    # student only (q = 0 where p > 0: finite for those, infinite for the forward KL, rightly). The reference
    # uses -1e4 instead of -inf: exp(-1e4 - lse) = 0 exactly in float64, so it needs no 0 log 0 convention.
    h, W, th, Wt, targets, mask = make(2)
    both, student_only = torch.tensor([3, 50, 388]), torch.tensor([7, 120])
    b, tb = torch.zeros(VS, dtype=torch.float64), torch.zeros(VT, dtype=torch.float64)
    b[both], tb[both] = -math.inf, -math.inf
    if mode != "forward":
        b[student_only] = -math.inf
    targets[torch.isin(targets, torch.cat([both, student_only]))] = -100  # CE of a banned target is +inf
    kw = dict(BASE, temperature=2.0, **MODES[mode])
    loss, parts, gh, gw, gb = run(
        fused_ce_exact_kl, h, W, th, Wt, targets, mask, bias=b.float(), teacher_bias=tb.float(), **kw
    )
    assert all(torch.isfinite(x).all() for x in (loss, gh, gw, gb))
    kw64 = {k: v for k, v in kw.items() if k not in ("chunk_rows", "vocab_size")}
    ref, rparts, rh, rw, rb = run(
        reference,
        h.double(),
        W.double(),
        teacher_logits(th, Wt, tb.clamp_min(-1e4)),
        targets,
        mask,
        bias=b.clamp_min(-1e4),
        **kw64,
    )
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert rel_err(gh, rh) < 1e-5 and rel_err(gw, rw) < 1e-5 and rel_err(gb, rb) < 1e-5
    assert (gb[b.isinf()] == 0).all()


def test_bf16_teacher_weight():
    # real teachers: bf16 lm-head; logits computed in bf16 like the teacher's own, so the reference uses the
    # same bf16-rounded teacher logits and the float32 student side keeps float32 tolerances
    h, W, th, Wt, targets, mask = make(4)
    Wt = Wt.bfloat16()
    for mode in ("forward", "jsd0.5"):
        compare(dict(BASE, temperature=2.0, **MODES[mode]), data=(h, W, th, Wt, targets, mask))


def test_bf16_frozen_student_head():
    h, W, th, Wt, targets, mask = make()
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16()
    loss, _ = fused_ce_exact_kl(hb, Wb, th, Wt.bfloat16(), targets, mask, **BASE)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad is None
    ref, _, rh, _, _ = run(
        reference,
        hb.detach().double(),
        Wb.double(),
        teacher_logits(th, Wt.bfloat16()),
        targets,
        mask,
        train_w=False,
        w_ce=BASE["w_ce"],
        w_kl=BASE["w_kl"],
    )
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=1e-3)
    assert rel_err(hb.grad.float() * 3, rh) < 3e-2


@pytest.mark.parametrize("train_w", [False, True])
def test_no_full_logits_and_no_weight_or_teacher_grad_buffers(train_w):
    # chunk 7 < R = 41: a chunk's (7, V) tensors are smaller than W (401 x 13), while the (41, V) logits of
    # either side, any (V, d) buffer and any copy of the teacher's head (397 x 17) are not
    h, W, th, Wt, targets, mask = make()
    h.requires_grad_(), W.requires_grad_(train_w), th.requires_grad_(), Wt.requires_grad_()
    with NewAllocations() as mode:
        loss, _ = fused_ce_exact_kl(h, W, th, Wt, targets, mask, **dict(BASE, jsd_beta=0.5))
        (3 * loss).backward()
    big = [s for s in mode.shapes if math.prod(s) >= VS * D]
    if train_w:
        assert big == [(VS, D)] and W.grad is not None  # positive control: exactly the one grad accumulator
    else:
        assert big == [] and W.grad is None
    assert h.grad is not None and th.grad is None and Wt.grad is None and torch.isfinite(loss)


class LiveWide(TorchDispatchMode):
    """Peak number of live (rows, >= V) tensors allocated under the mode: `chunk` ones (more than chunked.SLICE rows;
    also their peak bytes) and `slice` ones (at most chunked.SLICE rows); alive = their storage is."""

    def __init__(self):
        super().__init__()
        self.live = []  # (weak ref, kind, bytes)
        self.peak = {"chunk": 0, "slice": 0}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = [e for e in self.live if not e[0].expired()]
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for o in torch.utils._pytree.tree_leaves(out):  # new (R, >= V) allocations: no views, no in-place results
            if (
                isinstance(o, torch.Tensor)
                and o.dim() == 2
                and o.shape[1] >= V
                and o.untyped_storage().data_ptr() not in inputs
            ):
                kind = "chunk" if o.shape[0] > chunked.SLICE else "slice"
                self.live.append((StorageWeakRef(o.untyped_storage()), kind, o.untyped_storage().nbytes()))
        for kind in self.peak:
            self.peak[kind] = max(self.peak[kind], sum(e[1] == kind for e in self.live))
        self.peak_bytes = max(self.peak_bytes, sum(e[2] for e in self.live if e[1] == "chunk"))
        return out


@pytest.mark.parametrize("case", ["forward", "reverse", "jsd0.5", "ce_only", "bf16"])
def test_peak_two_chunk_buffers(case, monkeypatch):
    # SLICE 2 < chunk 7, so a chunk's (C, V) buffers and the SLICE-row temporaries are told apart by shape
    monkeypatch.setattr(chunked, "SLICE", 2)
    h, W, th, Wt, targets, mask = make()
    kw = dict(BASE, temperature=2.0, **MODES.get(case, {}))
    if case == "ce_only":
        kw["w_kl"] = 0.0
    if case == "bf16":
        h, W, Wt = h.bfloat16(), W.bfloat16(), Wt.bfloat16()
    h.requires_grad_(), W.requires_grad_(case != "bf16")
    with LiveWide() as mode:
        loss, _ = fused_ce_exact_kl(h, W, th, Wt, targets, mask, **kw)
        loss.backward()
    print(
        f"{case}: chunk buffers {mode.peak['chunk']}, {mode.peak_bytes / (7 * V * 4):.2f} x (C, V) float32; "
        f"slice temporaries {mode.peak['slice']}"
    )
    assert mode.peak["chunk"] <= 2 and mode.peak_bytes <= 2 * 7 * V * 4
    assert mode.peak["slice"] <= 4


def test_no_grad_allocates_no_gradients():
    h, W, th, Wt, targets, mask = make()
    with torch.no_grad(), NewAllocations() as mode:
        loss, _ = fused_ce_exact_kl(h.requires_grad_(), W.requires_grad_(), th, Wt, targets, mask, **BASE)
    assert not any(s in ((R, D), (VS, D)) for s in mode.shapes)
    ref, _ = reference(h.double(), W.double(), teacher_logits(th, Wt), targets, mask, w_ce=0.7, w_kl=1.3)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_backward_twice_is_refused():
    h, W, th, Wt, targets, mask = make()
    loss, _ = fused_ce_exact_kl(h.requires_grad_(), W, th, Wt, targets, mask, **BASE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_teacher_optional_without_kl():
    h, W, th, Wt, targets, mask = make()
    loss, parts = fused_ce_exact_kl(h, W, None, None, targets, w_kl=0.0, vocab_size=V)
    assert parts.keys() == {"ce"}
    torch.testing.assert_close(loss, fused_ce_exact_kl(h, W, th, Wt, targets, mask, w_kl=0.0, vocab_size=V)[0])


def test_refusals():
    h, W, th, Wt, targets, mask = make()
    with pytest.raises(TypeError, match="kl_mask must be a bool tensor"):
        fused_ce_exact_kl(h, W, th, Wt, targets, mask.long(), **BASE)
    for tau in (0.0, -2.0, math.nan):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fused_ce_exact_kl(h, W, th, Wt, targets, mask, **dict(BASE, temperature=tau))
    with pytest.raises(ValueError, match="exclusive"):
        fused_ce_exact_kl(h, W, th, Wt, targets, mask, **dict(BASE, jsd_beta=0.5, reverse=True))
    for beta in (1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="jsd_beta"):
            fused_ce_exact_kl(h, W, th, Wt, targets, mask, **dict(BASE, jsd_beta=beta))
    for vs in (None, VT + 1):  # default = the student's 401 logits, more than the teacher's 397
        with pytest.raises(ValueError, match="teacher head"):
            fused_ce_exact_kl(h, W, th, Wt, targets, mask, **dict(BASE, vocab_size=vs))
    with pytest.raises(ValueError, match="student head"):
        fused_ce_exact_kl(h, W, th, Wt, targets, mask, **dict(BASE, vocab_size=VS + 1))
    with pytest.raises(ValueError, match="needs teacher_h"):
        fused_ce_exact_kl(h, W, None, None, targets, mask, **BASE)

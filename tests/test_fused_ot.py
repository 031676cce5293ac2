"""OT on logits from hidden states (only the teacher's top-k columns of the lm_head) against `ot_logits_loss`
on full float64 logits: awkward shapes B=3, N=41, M=37, k=7, d=13, 401 logit columns of which 389 are tokens."""

import math

import pytest
import torch

from pipeline.losses.fused_ot import ot_logits_loss_from_hidden
from pipeline.losses.ot import OTSolver, ot_logits_loss
from tests.conftest import NewAllocations, padded_masks, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

B, N, M, K, D, VL, V = 3, 41, 37, 7, 13, 401, 389
EPS = 0.01  # S is a probability overlap in [0, 1]: C's spread is small, so eps must be too


def make(seed=0):
    """Student position i's hidden state is a noisy copy of a random teacher position's, so the plan is far
    from uniform; padded vocabulary rows of W are huge (they would dominate if not dropped)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(VL, D, generator=g, dtype=torch.float64)
    W[V:] *= 50
    y = 1.5 * torch.randn(B, M, D, generator=g, dtype=torch.float64)
    src = torch.randint(0, M, (B, N), generator=g)
    h = y.gather(1, src[..., None].expand(B, N, D)) + 0.5 * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    t_lp, t_ids = (y @ W[:V].T).log_softmax(-1).topk(K, dim=-1)  # (B, M, K)
    x_mask, y_mask = padded_masks(B, N, M)
    t_ids[~y_mask] = -1  # padding rows of the cache may hold anything
    t_lp[~y_mask] = -math.inf
    return h, W, t_ids, t_lp, x_mask, y_mask


def reference(h, W, bias, t_ids, t_lp, x_mask, y_mask, tau=1.0):
    """ot_logits_loss on the full float64 logits (ids of padding rows made valid: it gathers them)."""
    ids = torch.where(y_mask[..., None], t_ids, 0)
    logits = h @ W.T + (bias if bias is not None else 0)  # (B, N, VL)
    return ot_logits_loss(
        logits,
        ids,
        torch.where(y_mask[..., None], t_lp, 0.0),
        x_mask,
        y_mask,
        vocab_size=V,
        score_temperature=tau,
        solver=OTSolver(eps=EPS, tol=1e-12, max_iter=20000),
    )[0]


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize(
    "train_w, use_bias, tau", [(False, False, 1.0), (True, False, 1.0), (True, True, 1.0), (True, True, 0.05)]
)
def test_matches_full_logits_reference(block, train_w, use_bias, tau):
    h64, W64, t_ids, t_lp, x_mask, y_mask = make()
    b64 = 0.3 * torch.randn(VL, dtype=torch.float64) if use_bias else None
    leaves64 = [t.requires_grad_() for t in (h64, W64, b64) if t is not None]
    ref = reference(h64, W64, b64, t_ids, t_lp, x_mask, y_mask, tau)
    (2 * ref).backward()

    h = h64.detach().float().requires_grad_()
    W = W64.detach().float().requires_grad_(train_w)
    b = b64.detach().float().requires_grad_() if use_bias else None
    loss, res = ot_logits_loss_from_hidden(
        h,
        W,
        t_ids,
        t_lp.float(),
        x_mask,
        y_mask,
        block=block,
        vocab_size=V,
        bias=b,
        chunk_rows=16,
        score_temperature=tau,
        solver=OTSolver(eps=EPS),
    )
    (2 * loss).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    assert rel_err(h.grad, h64.grad) < 1e-4
    assert (h.grad[~x_mask] == 0).all()
    if train_w:
        assert rel_err(W.grad, W64.grad) < 1e-4 and (W.grad[V:] == 0).all()
    else:
        assert W.grad is None
    if use_bias:
        assert rel_err(b.grad, leaves64[2].grad) < 1e-4
    assert W64.grad[:V].abs().max() > 0  # the reference really does depend on W


def test_chunk_and_block_sizes_change_only_rounding():
    h, W, t_ids, t_lp, x_mask, y_mask = (t.float() if t.is_floating_point() else t for t in make())
    outs = []
    for block, chunk in ((1, 1), (7, 16), (64, 1000)):
        hh = h.clone().requires_grad_()
        loss, _ = ot_logits_loss_from_hidden(
            hh,
            W,
            t_ids,
            t_lp,
            x_mask,
            y_mask,
            block=block,
            vocab_size=V,
            chunk_rows=chunk,
            solver=OTSolver(eps=EPS),
        )
        loss.backward()
        outs.append((loss.detach(), hh.grad))
    for loss, g in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(g, outs[0][1], rtol=1e-4, atol=1e-7)


def test_no_vocabulary_wide_tensor_when_the_head_is_frozen():
    # chunk_rows = 4 rows: every allocation stays below N x V (a sequence's full logits) and V x d (a weight
    # gradient), so "all allocations < min of the two" rules out both
    h, W, t_ids, t_lp, x_mask, y_mask = (t.float() if t.is_floating_point() else t for t in make())
    h.requires_grad_()
    with NewAllocations() as mode:
        loss, _ = ot_logits_loss_from_hidden(
            h,
            W,
            t_ids,
            t_lp,
            x_mask,
            y_mask,
            block=4,
            vocab_size=V,
            chunk_rows=4,
            solver=OTSolver(eps=EPS),
        )
        loss.backward()
    limit = min(N * V, VL * D)
    big = [s for s in mode.shapes if math.prod(s) >= limit]
    assert big == [] and W.grad is None and torch.isfinite(h.grad).all()
    assert max(math.prod(s) for s in mode.shapes) >= 4 * V  # positive control: the chunk pass was seen


def test_all_masked_is_zero():
    h, W, t_ids, t_lp, x_mask, y_mask = (t.float() if t.is_floating_point() else t for t in make())
    h.requires_grad_()
    loss, _ = ot_logits_loss_from_hidden(
        h, W, t_ids, t_lp, x_mask, torch.zeros_like(y_mask), vocab_size=V, solver=OTSolver(eps=EPS)
    )
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all()


def test_plain_and_fused_sanitise_padding_alike():
    # padding may hold anything on both sides: hidden states NaN, ids -1 or beyond the vocabulary (even
    # beyond the logits), log-probs NaN. The plain loss on full float64 logits and the fused one agree, with
    # no hand-cleaning of the inputs, and their gradients are finite and 0 on padding
    h64, W64, t_ids, t_lp, x_mask, y_mask = make(1)
    h64[~x_mask] = math.nan
    t_ids[1, 20:, :3] = V + 3  # a padding column of the logits
    t_ids[1, 20:, 3] = VL + 5  # not a column at all
    t_lp[2, -3:] = math.nan
    h64.requires_grad_()
    ref, _ = ot_logits_loss(
        h64 @ W64.T, t_ids, t_lp, x_mask, y_mask, vocab_size=V, solver=OTSolver(eps=EPS, tol=1e-12, max_iter=20000)
    )
    (2 * ref).backward()
    h = h64.detach().float().requires_grad_()
    loss, _ = ot_logits_loss_from_hidden(
        h,
        W64.float(),
        t_ids,
        t_lp.float(),
        x_mask,
        y_mask,
        vocab_size=V,
        block=5,
        chunk_rows=16,
        solver=OTSolver(eps=EPS),
    )
    (2 * loss).backward()
    assert torch.isfinite(ref) and torch.isfinite(h64.grad).all() and torch.isfinite(h.grad).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    assert rel_err(h.grad, h64.grad) < 1e-4
    assert (h.grad[~x_mask] == 0).all() and (h64.grad[~x_mask] == 0).all()


@pytest.mark.parametrize("bad", [-1, V])
def test_out_of_vocabulary_teacher_id_on_a_real_row_is_refused(bad):
    # on an unmasked row an id outside [0, V) is no token of the student: both refuse it alike, rather than
    # one reading token 0 in its place and the other failing inside a gather
    h, W, t_ids, t_lp, x_mask, y_mask = (t.float() if t.is_floating_point() else t for t in make())
    t_ids[0, 3, 2] = bad
    with pytest.raises(ValueError, match=rf"teacher_ids .* \[0, {V}\).* got {bad}"):
        ot_logits_loss(h @ W.T, t_ids, t_lp, x_mask, y_mask, vocab_size=V, solver=OTSolver(eps=EPS))
    with pytest.raises(ValueError, match=rf"teacher_ids .* \[0, {V}\).* got {bad}"):
        ot_logits_loss_from_hidden(h, W, t_ids, t_lp, x_mask, y_mask, vocab_size=V, solver=OTSolver(eps=EPS))


def test_refuses_integer_masks_and_nonpositive_eps():
    h, W, t_ids, t_lp, x_mask, y_mask = (t.float() if t.is_floating_point() else t for t in make())
    with pytest.raises(TypeError, match="y_mask must be a bool tensor"):
        ot_logits_loss_from_hidden(h, W, t_ids, t_lp, x_mask, y_mask.long(), vocab_size=V, solver=OTSolver(eps=EPS))
    for eps in (0.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="eps must be > 0"):
            ot_logits_loss_from_hidden(h, W, t_ids, t_lp, x_mask, y_mask, vocab_size=V, solver=OTSolver(eps=eps))

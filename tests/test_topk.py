"""Teacher top-k log-probs, tail mass and the observed token's log-prob against a float64 dense reference."""

import pytest
import torch

from cache.schema import LOG_FLOOR
from pipeline.losses import kl
from pipeline.teacher.topk import topk_from_hidden, topk_logprobs
from tests.conftest import NewAllocations


def reference(logits: torch.Tensor, k: int, vocab_size: int):
    """Dense float64: log-softmax over the real vocabulary, top-k, log of the remaining probability."""
    lp = torch.log_softmax(logits[:, :vocab_size].double(), dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1.0))
    return ids, vals, tail


def test_matches_float64_reference_awkward_shape():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(41, 401, generator=g) * 3  # (R, V_logits)
    ids, lp, tail, observed = topk_logprobs(logits, 7, vocab_size=389)
    rids, rlp, rtail = reference(logits, 7, 389)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp.double(), rlp, rtol=0, atol=1e-5)
    torch.testing.assert_close(tail.double(), rtail, rtol=1e-5, atol=1e-6)
    assert lp.dtype == tail.dtype == torch.float32
    assert observed is None  # no targets given


def test_padded_logit_columns_are_never_candidates():
    logits = torch.zeros(3, 20)
    logits[:, 16:] = 50.0  # padded columns with huge logits, as random padding rows can produce
    ids, lp, tail, _ = topk_logprobs(logits, 4, vocab_size=16)
    assert (ids < 16).all()
    # the real 16 tokens are uniform: each 1/16, tail = 12/16
    torch.testing.assert_close(lp, torch.full((3, 4), -torch.log(torch.tensor(16.0)).item()))
    torch.testing.assert_close(tail, torch.full((3,), torch.log(torch.tensor(0.75)).item()))


def test_tail_when_topk_hold_almost_all_mass():
    logits = torch.full((2, 300), -45.0)
    logits[:, :5] = torch.tensor([0.0, -1.0, -2.0, -3.0, -4.0])  # the other 295 hold ~1e-17 of the mass
    logits[1, 5:] = -200.0  # a tail beyond float32 altogether
    ids, lp, tail, _ = topk_logprobs(logits, 5, vocab_size=300)
    # 1 - sum(p) rounds to exactly 0 even in float64, so the reference takes the excluded logits directly
    exact = torch.logsumexp(logits[:, 5:].double(), -1) - torch.logsumexp(logits.double(), -1)
    naive = torch.log1p(-lp.double().exp().sum(-1).clamp(max=1.0))
    assert torch.isinf(naive).all()  # what log(1 - sum p) would have stored
    assert torch.isfinite(tail).all() and not torch.isnan(lp).any()
    assert abs(tail[0].item() - exact[0].item()) < 1e-4  # about -39.4
    assert tail[1].item() == LOG_FLOOR  # exact is about -195: floored, finite


def test_observed_logprob_matches_float64_reference():
    """The target's log-prob over the real vocabulary (vocab_size < logit columns), in the top-k or not; in the top-k
    it is bit-equal to the top-k value (one normaliser), and a target far below everything is floored."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 401, generator=g) * 3  # (R, V_logits)
    logits[:, 389:] = 60.0  # padded columns that would dominate a softmax over all 401 columns
    targets = torch.randint(0, 389, (40,), generator=g)  # (R,)
    targets[0] = logits[0, :389].argmax()  # certainly in the top-k
    targets[1] = logits[1, :389].argmin()  # certainly outside
    logits[2, targets[2]] = -1e4  # log p ~ -1e4: floored like the tail
    ids, lp, _, observed = topk_logprobs(logits, 7, vocab_size=389, targets=targets)
    ref = torch.log_softmax(logits[:, :389].double(), -1).gather(1, targets[:, None])[:, 0]  # (R,)
    assert observed.dtype == torch.float32 and observed.shape == (40,)
    torch.testing.assert_close(observed[3:].double(), ref[3:], rtol=0, atol=1e-5)
    assert observed[2].item() == LOG_FLOOR and ref[2].item() < -9000
    inside = (ids == targets[:, None]).any(1)  # (R,)
    assert inside[0] and not inside[1] and 0 < int(inside.sum()) < 40
    torch.testing.assert_close(observed[:2].double(), ref[:2], rtol=0, atol=1e-5)
    at = (ids == targets[:, None]).float().argmax(1)  # (R,) the target's rank where it is in the top-k
    assert torch.equal(observed[inside], lp[inside, at[inside]])  # exactly the top-k value
    assert (observed[~inside] <= lp[~inside, -1]).all()


def test_observed_logprob_costs_no_row_by_vocabulary_buffer():
    """The observed log-prob is a gather from the fp32 copy: with targets, no more (R, V) tensors are allocated."""
    logits, targets = torch.randn(32, 500), torch.randint(0, 480, (32,))  # (R, V_logits), (R,)

    def big_allocations(**kw):
        with NewAllocations() as mode:
            topk_logprobs(logits, 5, vocab_size=480, **kw)
        return [s for s in mode.shapes if len(s) == 2 and s[1] >= 480]

    assert big_allocations(targets=targets) == big_allocations() == [(32, 480)]  # the fp32 copy only


def test_observed_targets_checked():
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 16\)"):
        topk_logprobs(torch.zeros(2, 32), 4, vocab_size=16, targets=torch.tensor([3, 16]))  # 16: a padded column
    with pytest.raises(ValueError, match=r"targets has shape \(3,\), expected \(2,\)"):
        topk_logprobs(torch.zeros(2, 32), 4, vocab_size=16, targets=torch.tensor([3, 1, 2]))


def test_chunking_changes_nothing():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(97, 13, generator=g)  # (V, D)
    h = torch.randn(50, 13, generator=g)  # (R, D)
    targets = torch.randint(0, 90, (50,), generator=g)  # (R,)
    head = lambda x: x @ W.T  # noqa: E731
    whole = topk_from_hidden(h, head, 6, 90, chunk_rows=1000, targets=targets)
    ref = torch.log_softmax((h.double() @ W.double().T)[:, :90], -1).gather(1, targets[:, None])[:, 0]  # (R,)
    torch.testing.assert_close(whole.observed.double(), ref, rtol=0, atol=1e-5)
    for chunk in (1, 7, 49):
        parts = topk_from_hidden(h, head, 6, 90, chunk_rows=chunk, targets=targets)
        for a, b in zip(whole, parts):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # matmul bits depend on shape
    assert topk_from_hidden(h, head, 6, 90, chunk_rows=7).observed is None
    empty = topk_from_hidden(h[:0], head, 6, 90)
    assert [t.shape for t in empty[:3]] == [(0, 6), (0, 6), (0,)] and empty.observed is None
    assert topk_from_hidden(h[:0], head, 6, 90, targets=targets[:0]).observed.shape == (0,)


def test_k_out_of_range():
    with pytest.raises(ValueError, match="k=20 must be between 1 and the vocabulary size 16"):
        topk_logprobs(torch.zeros(2, 32), 20, vocab_size=16)


def test_the_losses_floor_is_the_caches():
    """Stage 1 stores tails floored at cache.schema.LOG_FLOOR, Stage 2 clamps to kl.LOG_FLOOR: one value."""
    assert kl.LOG_FLOOR == LOG_FLOOR

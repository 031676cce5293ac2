"""Losses against float64 references written here: dense per-token CE, the exact KL of the coarse-grained
(k+1)-bucket distributions from full logits, and OT on the unpadded problems with unrolled Sinkhorn."""

import math

import pytest
import torch

from pipeline.losses.kl import ce_loss, topk_kl_loss
from pipeline.losses.ot import (
    OTSolver,
    cost_from_similarity,
    cost_spread,
    init_projection,
    ot_hidden_loss,
    ot_logits_loss,
)
from tests.conftest import rel_err, unrolled_log_plan

pytestmark = pytest.mark.usefixtures("one_thread")

V, K = 401, 7


# ---------------------------------------------------------------------------------------------------------
# CE
# ---------------------------------------------------------------------------------------------------------


def ref_ce(logits, labels, n=None):
    """Token by token: -log softmax(logits[b, t])[labels[b, t + 1]] over supervised targets, float64."""
    logp = logits.double().log_softmax(-1)  # (B, L, V)
    total, count = 0.0, 0
    for b, t in (labels[:, 1:] != -100).nonzero().tolist():
        total = total - logp[b, t, labels[b, t + 1]]
        count += 1
    return total / (n if n is not None else max(count, 1))


def make_ce(seed=0, B=3, L=41):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < 0.3] = -100
    labels[1] = -100  # one fully unsupervised row
    return logits, labels


@pytest.mark.parametrize("num_items", [None, 123])
def test_ce_matches_reference(num_items):
    logits, labels = make_ce()
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    loss = ce_loss(x, labels, num_items)
    ref = ref_ce(x64, labels, num_items)
    (2 * loss).backward()
    (2 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-8)
    assert (x.grad[1] == 0).all() and (x.grad[:, -1] == 0).all()  # no label, and nothing after the last token


def test_ce_vocab_padding_ignored():
    logits, labels = make_ce()
    padded = torch.cat([logits, torch.full((*logits.shape[:2], 5), 50.0)], -1)  # fake columns, huge logits
    torch.testing.assert_close(ce_loss(padded, labels, vocab_size=V), ce_loss(logits, labels))


def test_ce_all_masked_is_zero():
    logits, labels = make_ce()
    labels[:] = -100
    x = logits.requires_grad_()
    loss = ce_loss(x, labels)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------
# KL on top-k + tail bucket
# ---------------------------------------------------------------------------------------------------------


def make_kl(seed=0, R=53, t_scale=3.0, s_scale=2.0):
    """Full teacher/student logits (float64), the teacher's cached top-k view, and a row mask."""
    g = torch.Generator().manual_seed(seed)
    t_logits = t_scale * torch.randn(R, V, generator=g, dtype=torch.float64)
    s_logits = s_scale * torch.randn(R, V, generator=g, dtype=torch.float64)
    lp = t_logits.log_softmax(-1)
    t_lp, ids = lp.topk(K, dim=-1)
    tail = lp.scatter(-1, ids, -math.inf).logsumexp(-1).clamp_min(-80.0)  # log(1 - sum p), as the cache does
    mask = torch.rand(R, generator=g) < 0.8
    mask[0] = False
    return t_logits, s_logits, ids, t_lp.float(), tail.float(), mask


def ref_bucket_kl(s_logits, t_logits, ids, mask, *, tau=1.0, tail="bucket", reverse=False):
    """Dense float64: coarse-grain the FULL distributions into [top-k tokens, rest], then KL."""
    p = t_logits.softmax(-1)  # (R, V) teacher, untempered (the cache stores tau = 1 log-probs)
    q = (s_logits / tau).softmax(-1)  # (R, V) student, tempered on the full vocabulary
    in_topk = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    P = p.gather(-1, ids)
    Q = q.gather(-1, ids)
    if tail == "bucket":
        P = torch.cat([P, (p * ~in_topk).sum(-1, keepdim=True)], -1)  # tail mass by summing, no cancellation
        Q = torch.cat([Q, (q * ~in_topk).sum(-1, keepdim=True)], -1)
    P = P ** (1 / tau)  # tempered buckets, renormalised below
    P, Q = P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)
    if reverse:
        P, Q = Q, P
    kl = (P * (P.log() - Q.log())).sum(-1)  # (R,)
    return kl[mask].sum() * tau**2 / max(mask.sum().item(), 1)


@pytest.mark.parametrize("tail", ["bucket", "none"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_kl_matches_coarse_grained_reference(tail, reverse, tau):
    t_logits, s_logits, ids, t_lp, t_tail, mask = make_kl()
    x = s_logits.float().requires_grad_()
    x64 = s_logits.clone().requires_grad_()
    loss = topk_kl_loss(x, ids, t_lp, t_tail, mask, temperature=tau, tail=tail, reverse=reverse)
    ref = ref_bucket_kl(x64, t_logits, ids, mask, tau=tau, tail=tail, reverse=reverse)
    (3 * loss).backward()
    (3 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kl_zero_when_student_is_teacher(reverse):
    t_logits, _, ids, t_lp, t_tail, mask = make_kl()
    x = t_logits.float().requires_grad_()
    loss = topk_kl_loss(x, ids, t_lp, t_tail, mask, reverse=reverse)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert x.grad.abs().max().item() < 1e-6


def test_topk_kl_peaked_distributions_stay_finite_and_exact():
    # teacher top-k hold all but e^-80 of the mass (tail at the cache floor); student top-k q ~ 1 - e^-55,
    # where log(1 - sum q) would cancel to log(0) in float32
    t_logits, s_logits, ids, t_lp, t_tail, mask = make_kl(t_scale=40.0, s_scale=1.0)
    s_logits = s_logits.scatter(-1, ids, 60.0 + s_logits.gather(-1, ids))
    assert (t_tail[mask] == -80).any()
    for reverse in (False, True):
        x = s_logits.float().requires_grad_()
        x64 = s_logits.clone().requires_grad_()
        loss = topk_kl_loss(x, ids, t_lp, t_tail, mask, reverse=reverse)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        if not reverse:  # forward KL: the floored teacher tail has no mass, so the dense reference applies
            ref = ref_bucket_kl(x64, t_logits, ids, mask)
            ref.backward()
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_topk_kl_options():
    t_logits, s_logits, ids, t_lp, t_tail, mask = make_kl()
    x = s_logits.float()
    base = topk_kl_loss(x, ids, t_lp, t_tail, mask)
    # num_items: global normalisation across micro-batches
    torch.testing.assert_close(topk_kl_loss(x, ids, t_lp, t_tail, mask, num_items=1000), base * mask.sum() / 1000)
    # padded vocabulary columns are not tokens
    padded = torch.cat([x, torch.full((x.shape[0], 9), 30.0)], -1)
    torch.testing.assert_close(topk_kl_loss(padded, ids, t_lp, t_tail, mask, vocab_size=V), base)
    # any leading dims: (B, L, V) with a (B, L) mask is the same as the flattened rows
    R = x.shape[0] - 1
    torch.testing.assert_close(
        topk_kl_loss(
            x[:R].view(4, R // 4, V),
            ids[:R].view(4, -1, K),
            t_lp[:R].view(4, -1, K),
            t_tail[:R].view(4, -1),
            mask[:R].view(4, -1),
        ),
        topk_kl_loss(x[:R], ids[:R], t_lp[:R], t_tail[:R], mask[:R]),
    )
    # k covering the whole vocabulary: no tail bucket, "bucket" is the same as "none"
    full_lp, full_ids = t_logits.float().log_softmax(-1).topk(V, dim=-1)
    floor = torch.full((x.shape[0],), -80.0)
    torch.testing.assert_close(
        topk_kl_loss(x, full_ids, full_lp, floor, mask), topk_kl_loss(x, full_ids, full_lp, None, mask, tail="none")
    )


@pytest.mark.parametrize("tail", ["bucket", "none"])
@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kl_all_masked_is_zero(tail, reverse):
    _, s_logits, ids, t_lp, t_tail, mask = make_kl()
    t_lp[:] = -math.inf  # garbage in masked rows must not leak
    x = s_logits.float().requires_grad_()
    loss = topk_kl_loss(x, ids, t_lp, t_tail, torch.zeros_like(mask), tail=tail, reverse=reverse, temperature=2.0)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------
# OT on hidden states and on logits
# ---------------------------------------------------------------------------------------------------------

B, N, M, d, D = 3, 41, 37, 13, 29


def masks():
    """Sequence 0 full, 1 padded on both sides, 2 has no teacher token at all (contributes 0)."""
    x_mask = torch.ones(B, N, dtype=torch.bool)
    y_mask = torch.ones(B, M, dtype=torch.bool)
    x_mask[1, 33:] = False
    y_mask[1, :4] = False
    y_mask[2] = False
    return x_mask, y_mask


def ref_ot_from_similarity(S, x_mask, y_mask, eps, objective="linear", n_iter=1500, temperature=1.0):
    """Mean over non-empty sequences of the OT loss on the unpadded problem; unrolled float64 Sinkhorn."""
    losses = []
    for s, xm, ym in zip(S, x_mask, y_mask):
        if not (xm.any() and ym.any()):
            continue
        c = 1 - (s[xm][:, ym] / temperature).softmax(-1)  # (n, m)
        log_T = unrolled_log_plan(c, eps, n_iter)
        value = (log_T.exp() * c).sum()
        if objective == "regularized":
            value = value + eps * (log_T.exp() * log_T).sum()
        losses.append(value)
    return torch.stack(losses).mean()


def make_hidden(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    proj = 2 * init_projection(D, d, generator=g, dtype=torch.float64)  # sharper S: a less uniform plan
    return x, y, proj


@pytest.mark.parametrize("objective", ["linear", "regularized"])
def test_ot_hidden_matches_reference(objective):
    x_mask, y_mask = masks()
    x64, y64, p64 = (t.requires_grad_() for t in make_hidden())
    x, y, proj = (t.detach().float().requires_grad_() for t in (x64, y64, p64))
    eps = 0.05

    # tol below the float32 default (1e-5), which alone gives ~5e-5 relative gradient error here
    loss, res = ot_hidden_loss(x, x_mask, y, y_mask, proj, solver=OTSolver(eps=eps, objective=objective, tol=1e-6))
    ref = ref_ot_from_similarity(x64 @ (y64 @ p64).transpose(1, 2) / math.sqrt(d), x_mask, y_mask, eps, objective)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    for got, want in [(x.grad, x64.grad), (proj.grad, p64.grad), (y.grad, y64.grad)]:
        assert rel_err(got, want) < 1e-4
    assert (x.grad[~x_mask] == 0).all() and (y.grad[~y_mask] == 0).all()
    assert res.n_iters[2] == 0 and (res.n_iters[:2] > 0).all()

    loss_sum, _ = ot_hidden_loss(
        x, x_mask, y, y_mask, proj, reduction="sum", solver=OTSolver(eps=eps, objective=objective)
    )
    torch.testing.assert_close(loss_sum, 2 * loss)  # 2 non-empty sequences


def test_ot_hidden_all_masked_is_zero():
    x_mask, y_mask = masks()
    x, y, proj = (t.float().requires_grad_() for t in make_hidden())
    loss, _ = ot_hidden_loss(x, torch.zeros_like(x_mask), y, y_mask, proj)
    loss.backward()
    assert loss.item() == 0
    for t in (x, y, proj):
        assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


def test_init_projection_keeps_unit_variance():
    g = torch.Generator().manual_seed(0)
    P = init_projection(512, 64, generator=g)
    Y = torch.randn(4096, 512, generator=g)
    assert P.shape == (512, 64)
    assert abs((Y @ P).var().item() - 1) < 0.1


def make_logits(seed=0, V_pad=V):
    """Student position i is a noisy copy of a random teacher position, so S_ij (a probability overlap)
    is large for the matching pairs and the plan is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    t_logits = 6 * torch.randn(B, M, V, generator=g, dtype=torch.float64)
    src = torch.randint(0, M, (B, N), generator=g)
    s_logits = t_logits.gather(1, src[..., None].expand(B, N, V)) + 2 * torch.randn(
        B, N, V, generator=g, dtype=torch.float64
    )
    s_logits = torch.cat([s_logits, torch.full((B, N, V_pad - V), 20.0, dtype=torch.float64)], -1)
    t_lp, t_ids = t_logits.log_softmax(-1).topk(K, dim=-1)  # (B, M, K)
    return s_logits, t_ids, t_lp


@pytest.mark.parametrize("block, V_pad, tau", [(5, V, 1.0), (64, V + 11, 1.0), (7, V + 11, 0.05)])
def test_ot_logits_matches_reference(block, V_pad, tau):
    """tau = 0.05: a cost spread over [0, 1] like the hidden one, so the hidden one's eps; the unrolled reference
    needs more iterations to converge on it."""
    x_mask, y_mask = masks()
    s64, t_ids, t_lp = make_logits(V_pad=V_pad)
    s64.requires_grad_()
    s = s64.detach().float().requires_grad_()
    # S lies in [0, 1], so C = 1 - softmax_j(S) has a spread of ~0.04: eps must be small (unless tau sharpens C)
    eps = 0.01 if tau == 1 else 0.05

    loss, res = ot_logits_loss(
        s,
        t_ids,
        t_lp.float(),
        x_mask,
        y_mask,
        block=block,
        vocab_size=V,
        score_temperature=tau,
        solver=OTSolver(eps=eps, tol=1e-6),
    )
    q = s64[..., :V].softmax(-1)  # (B, N, V)
    Y = torch.zeros(B, M, V, dtype=torch.float64).scatter(-1, t_ids, t_lp.exp())  # dense teacher top-k
    ref = ref_ot_from_similarity(q @ Y.transpose(1, 2), x_mask, y_mask, eps, temperature=tau, n_iter=5000)
    (2 * loss).backward()
    (2 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    assert rel_err(s.grad, s64.grad) < 1e-4
    assert (s.grad[~x_mask] == 0).all() and (s.grad[..., V:] == 0).all()
    assert res.converged[:2].all()


def test_ot_logits_score_temperature_sharpens_the_cost():
    """At temperature 1 a row of the logits cost barely moves off 1 - 1/M; at 0.05 it separates the teacher tokens
    a student position matches (std(C)/mean(C) is what Stage 2 logs as ot_cost_spread_logits)."""
    x_mask, y_mask = masks()
    s64, t_ids, t_lp = make_logits()
    spread = {
        tau: ot_logits_loss(
            s64.float(), t_ids, t_lp.float(), x_mask, y_mask, score_temperature=tau, solver=OTSolver(eps=0.01)
        )[1].cost_spread[:2]
        for tau in (1.0, 0.05)
    }
    assert (spread[0.05] > 10 * spread[1.0]).all(), spread


def test_ot_logits_all_masked_is_zero():
    x_mask, y_mask = masks()
    s64, t_ids, t_lp = make_logits()
    s = s64.float().requires_grad_()
    loss, _ = ot_logits_loss(s, t_ids, t_lp.float(), x_mask, torch.zeros_like(y_mask))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------
# What the losses refuse or survive
# ---------------------------------------------------------------------------------------------------------


def test_integer_masks_are_refused():
    # a 0/1 integer mask would index rows 0 and 1 (x[mask]) instead of selecting: a silently wrong value
    t_logits, s_logits, ids, t_lp, t_tail, mask = make_kl()
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        topk_kl_loss(s_logits.float(), ids, t_lp, t_tail, mask.long())
    x_mask, y_mask = masks()
    x, y, proj = (t.float() for t in make_hidden())
    with pytest.raises(TypeError, match="x_mask must be a bool tensor"):
        ot_hidden_loss(x, x_mask.int(), y, y_mask, proj)
    with pytest.raises(TypeError, match="y_mask must be a bool tensor"):
        ot_hidden_loss(x, x_mask, y, y_mask.float(), proj)
    s64, t_ids, t_lp = make_logits()
    with pytest.raises(TypeError, match="x_mask must be a bool tensor"):
        ot_logits_loss(s64.float(), t_ids, t_lp.float(), x_mask.long(), y_mask)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_nonpositive_temperature_and_eps_are_refused(value):
    t_logits, s_logits, ids, t_lp, t_tail, mask = make_kl()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        topk_kl_loss(s_logits.float(), ids, t_lp, t_tail, mask, temperature=value)
    x_mask, y_mask = masks()
    x, y, proj = (t.float() for t in make_hidden())
    with pytest.raises(ValueError, match="eps must be > 0"):
        ot_hidden_loss(x, x_mask, y, y_mask, proj, solver=OTSolver(eps=value))
    s64, t_ids, t_lp = make_logits()
    with pytest.raises(ValueError, match="eps must be > 0"):
        ot_logits_loss(s64.float(), t_ids, t_lp.float(), x_mask, y_mask, solver=OTSolver(eps=value))


def ref_reverse_kl_logspace(s_logits, t_logits, ids, mask, *, tail="bucket"):
    """Dense float64 KL(student || teacher) of the (k+1)-bucket distributions, in log space: a student
    bucket of probability exactly 0 has a finite log-prob here (its logit is very negative, not -inf), so
    the reference needs no 0 log 0 convention of its own."""

    def buckets(logits):
        lp = logits.log_softmax(-1)  # (R, V)
        b = lp.gather(-1, ids)  # (R, k)
        if tail == "bucket":
            rest = lp.masked_fill(torch.zeros_like(lp, dtype=torch.bool).scatter(-1, ids, True), -math.inf)
            return torch.cat([b, rest.logsumexp(-1, keepdim=True)], -1)
        return b.log_softmax(-1)

    s, t = buckets(s_logits), buckets(t_logits)
    kl = (s.exp() * (s - t)).sum(-1)  # (R,)
    return kl[mask].sum() / max(mask.sum().item(), 1)


@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_reverse_kl_with_minus_inf_student_logit(tail):
    # a -inf student logit at a teacher id (e.g. a banned token): the student bucket has probability 0 and
    # contributes 0 log 0 = 0 to KL(student || teacher), in value and gradient
    t_logits, s_logits, ids, t_lp, t_tail, mask = make_kl()
    rows = mask.nonzero()[:, 0][::3]  # a third of the counted rows
    s_logits[rows, ids[rows, 0]] = -math.inf  # the teacher's most likely token
    s_logits[rows[:3], ids[rows[:3], 4]] = -math.inf  # two zero buckets in some rows
    x = s_logits.float().requires_grad_()
    x64 = s_logits.masked_fill(torch.isinf(s_logits), -1e4).requires_grad_()  # exp(-1e4 - lse) = 0 in float64
    loss = topk_kl_loss(x, ids, t_lp, t_tail, mask, tail=tail, reverse=True)
    ref = ref_reverse_kl_logspace(x64, t_logits, ids, mask, tail=tail)
    (3 * loss).backward()
    (3 * ref).backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert (x.grad[torch.isinf(s_logits)] == 0).all()


def test_ot_hidden_nan_in_padding_stays_out():
    # padding rows of the hidden states may hold anything (uninitialised memory, a NaN from a masked
    # position): value and every gradient equal those with clean padding, and stay finite
    x_mask, y_mask = masks()
    clean = make_hidden()
    dirty = [t.clone() for t in clean]
    dirty[0][~x_mask] = math.nan
    dirty[1][~y_mask] = math.nan
    out = []
    for x, y, proj in (clean, dirty):
        x, y, proj = (t.clone().requires_grad_() for t in (x, y, proj))
        loss, _ = ot_hidden_loss(x, x_mask, y, y_mask, proj, solver=OTSolver(eps=0.05, tol=1e-9))
        (2 * loss).backward()
        out.append((loss, x.grad, y.grad, proj.grad))
    for got, want in zip(out[1], out[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (out[1][1][~x_mask] == 0).all() and (out[1][2][~y_mask] == 0).all()


def test_cost_spread_against_float64_and_as_the_losses_report_it():
    """std(C)/mean(C) over each sequence's valid entries (population std), 0 for an empty problem; the OT losses
    report it for the very cost they built."""
    torch.manual_seed(3)
    B, N, M, d, D = 4, 7, 11, 5, 6
    x, y = torch.randn(B, N, d), torch.randn(B, M, D)
    x_mask = torch.rand(B, N) > 0.3
    y_mask = torch.rand(B, M) > 0.3
    x_mask[:, 0] = y_mask[:, 0] = True
    x_mask[3] = False  # an empty problem
    x[~x_mask] = float("nan")  # garbage in padding must not leak in
    proj = init_projection(D, d)
    loss, res = ot_hidden_loss(x, x_mask, y, y_mask, proj)
    xs, ys = torch.where(x_mask[..., None], x, 0.0), y
    C = cost_from_similarity(xs @ (ys @ proj).transpose(1, 2) / math.sqrt(d), y_mask)
    want = []
    for b in range(B):
        vals = [float(C[b, i, j]) for i in range(N) for j in range(M) if x_mask[b, i] and y_mask[b, j]]
        if not vals:
            want.append(0.0)
            continue
        mean = math.fsum(vals) / len(vals)
        want.append(math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / len(vals)) / mean)
    torch.testing.assert_close(cost_spread(C, x_mask, y_mask), torch.tensor(want), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.cost_spread, torch.tensor(want), rtol=1e-4, atol=1e-6)
    assert res.cost_spread[3] == 0
    flat = torch.full((1, 3, 4), 0.75)  # a constant cost: no spread at all
    assert cost_spread(flat, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)).item() == 0


def test_a_flat_ot_cost_is_warned_about_once_per_term():
    from types import SimpleNamespace

    from pipeline.distill.train import FLAT_COST, DistillTrainer

    fake = SimpleNamespace(_warned_flat=set(), state=SimpleNamespace(global_step=7))
    with pytest.warns(UserWarning, match="the logits OT cost is flat") as caught:
        DistillTrainer._warn_flat(fake, {"ot_cost_spread_logits": FLAT_COST / 10, "ot_cost_spread_hidden": 0.2})
    assert len(caught) == 1 and "step 7" in str(caught[0].message)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second flat window of the same term: no second warning
        DistillTrainer._warn_flat(fake, {"ot_cost_spread_logits": FLAT_COST / 10, "loss": 1.0})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"objective": "entropic"}, "objective must be one of"),
        ({"eps_scale": "mean"}, "eps_scale must be one of"),
        ({"tol": -1e-6}, "tol must be > 0"),
        ({"max_iter": 0}, "max_iter must be an int >= 1"),
    ],
)
def test_ot_solver_settings_are_checked_once_where_they_are_built(kw, match):
    with pytest.raises(ValueError, match=match):
        OTSolver(**kw)

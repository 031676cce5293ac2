"""Sinkhorn solver and OT gradients against float64 references written here (plain per-sequence loops on the
unpadded problem, unrolled autograd, POT)."""

import functools

import numpy as np
import pytest
import torch

from pipeline.losses.implicit import ot_loss
from pipeline.losses.sinkhorn import sinkhorn
from tests.conftest import padded_masks, rel_err, unrolled_log_plan

pytestmark = pytest.mark.usefixtures("one_thread")

B, N, M = 3, 41, 37  # awkward on purpose: N != M, both prime
W = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # non-unit upstream gradient per sequence


def make_problem(dtype=torch.float64, seed=0, peaked=False):
    """Costs in [0, 1] and masks: sequence 0 full, 1 right-padded on both sides, 2 left/right-padded."""
    g = torch.Generator().manual_seed(seed)
    if peaked:  # the OT losses' cost shape: 1 - row softmax of sharp similarities
        C = 1 - (4 * torch.randn(B, N, M, generator=g, dtype=torch.float64)).softmax(-1)
    else:
        C = torch.rand(B, N, M, generator=g, dtype=torch.float64)
    return C.to(dtype), *padded_masks(B, N, M)


def ref_plans(C, a_mask, b_mask, eps, n_iter):
    """Unrolled float64 log-domain Sinkhorn on each unpadded problem, with autograd.
    Yields (plan (n, m), log plan, cost (n, m)) per sequence."""
    for c_full, am, bm in zip(C, a_mask, b_mask):
        c = c_full[am][:, bm]  # (n, m)
        log_T = unrolled_log_plan(c, eps, n_iter)
        yield log_T.exp(), log_T, c


def ref_ot(C, a_mask, b_mask, eps, objective="linear", n_iter=600):
    """(B,) float64 reference loss, differentiable by unrolling."""
    out = []
    for T, log_T, c in ref_plans(C, a_mask, b_mask, eps, n_iter):
        value = (T * c).sum()
        if objective == "regularized":
            value = value + eps * (T * log_T).sum()
        out.append(value)
    return torch.stack(out)


@functools.lru_cache
def ref_value_and_grad(eps, peaked, objective):
    """Cached: the float64 unrolled reference is the slow part of these tests."""
    C, a_mask, b_mask = make_problem(torch.float64, peaked=peaked)
    C.requires_grad_()
    value = ref_ot(C, a_mask, b_mask, eps, objective)
    (value * W).sum().backward()
    return value.detach(), C.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_marginals_and_padding(dtype, eps):
    C, a_mask, b_mask = make_problem(dtype)
    C[~a_mask] = float("nan")  # padding may hold garbage: it must not leak
    res = sinkhorn(C, a_mask, b_mask, eps)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    a = a_mask / a_mask.sum(-1, keepdim=True)
    b = b_mask / b_mask.sum(-1, keepdim=True)
    row_err = (res.plan.sum(2).double() - a).abs().sum(-1)
    col_err = (res.plan.sum(1).double() - b).abs().sum(-1)
    assert (row_err + col_err <= 2 * tol).all(), (row_err, col_err)
    torch.testing.assert_close(res.err.double(), row_err + col_err, rtol=1e-3, atol=1e-7)
    pad = ~(a_mask[:, :, None] & b_mask[:, None, :])
    assert (res.plan[pad] == 0).all()
    assert (res.f[~a_mask] == 0).all() and (res.g[~b_mask] == 0).all()
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    assert ((res.n_iters > 0) & (res.n_iters < 1000)).all()
    assert res.plan.grad_fn is None  # solved under no_grad


def test_matches_pot():
    ot = pytest.importorskip("ot")
    C, a_mask, b_mask = make_problem(torch.float64)
    eps = 0.05
    res = sinkhorn(C, a_mask, b_mask, eps, tol=1e-12, max_iter=5000)
    for i in range(B):
        c = C[i][a_mask[i]][:, b_mask[i]].numpy()
        n, m = c.shape
        T_pot = ot.sinkhorn(
            np.full(n, 1 / n), np.full(m, 1 / m), c, eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-14
        )
        np.testing.assert_allclose(res.plan[i][a_mask[i]][:, b_mask[i]].numpy(), T_pot, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("eps", [0.005, 0.01, 1.0])
def test_float32_extreme_eps_finite_and_close(eps):
    # (max C - min C) / eps = 200 at eps = 0.005: exp(-C/eps) would underflow in textbook float32 kernel Sinkhorn
    C, a_mask, b_mask = make_problem(torch.float64, seed=1)
    res32 = sinkhorn(C.float(), a_mask, b_mask, eps, max_iter=2000)
    res64 = sinkhorn(C, a_mask, b_mask, eps, tol=1e-10, max_iter=5000)
    for t in res32:
        assert t is None or torch.isfinite(t).all()  # cost_spread is set by the OT losses, not the solver
    assert (res32.err <= 2e-5).all()  # the stopping rule is 1e-5 on the rows; err adds the columns
    l1 = (res32.plan.double() - res64.plan).abs().sum((1, 2))  # total mass is 1 per sequence
    assert (l1 <= 1e-4).all(), l1


@pytest.mark.parametrize("domain", ["log", "kernel"])
def test_batch_mates_do_not_matter(domain):
    # finished sequences leave the working batch: solving one alone gives the same answer as solving it in a
    # batch (bit for bit in the log domain; batched bmm may round differently from a batch of one). One eps
    # per sequence, so they need different numbers of stages and iterations.
    C, a_mask, b_mask = make_problem(torch.float32)
    eps = torch.tensor([0.01, 0.05, 0.2])
    res = sinkhorn(C, a_mask, b_mask, eps, domain=domain)
    assert len(set(res.n_iters.tolist())) == B  # the sequences really did stop at different iterations
    assert res.converged.all()
    for i in range(B):
        alone = sinkhorn(C[i : i + 1], a_mask[i : i + 1], b_mask[i : i + 1], eps[i].item(), domain=domain)
        assert alone.n_iters.item() == res.n_iters[i].item()
        atol = 0 if domain == "log" else 1e-7
        torch.testing.assert_close(alone.plan[0], res.plan[i], rtol=0, atol=atol)


@pytest.mark.parametrize("objective", ["linear", "regularized"])
def test_empty_problems_give_zero_and_zero_grad(objective):
    C, a_mask, b_mask = make_problem(torch.float32)
    b_mask[0] = False  # no teacher token
    a_mask[1] = False  # no student token
    C.requires_grad_()
    loss, res = ot_loss(C, a_mask, b_mask, 0.05, objective)
    assert loss[0] == 0 and loss[1] == 0 and loss[2] != 0
    assert (res.n_iters[:2] == 0).all() and (res.plan[:2] == 0).all()
    loss.sum().backward()
    assert torch.isfinite(C.grad).all()
    assert (C.grad[:2] == 0).all()

    a_mask[:] = False  # everything masked
    C.grad = None
    loss, _ = ot_loss(C, a_mask, b_mask, 0.05, objective)
    loss.sum().backward()
    assert (loss == 0).all() and (C.grad == 0).all()


@pytest.mark.parametrize("dtype, tol, max_rel", [(torch.float64, 1e-13, 1e-8), (torch.float32, None, 1e-4)])
@pytest.mark.parametrize("eps, peaked", [(0.05, False), (0.1, True)])
def test_linear_grad_matches_unrolled_float64(dtype, tol, max_rel, eps, peaked):
    C64, a_mask, b_mask = make_problem(torch.float64, peaked=peaked)
    value_ref, grad_ref = ref_value_and_grad(eps, peaked, "linear")
    C = C64.to(dtype).requires_grad_()
    value, res = ot_loss(C, a_mask, b_mask, eps, "linear", tol=tol, max_iter=5000)
    (value * W.to(dtype)).sum().backward()

    torch.testing.assert_close(value.double(), value_ref, rtol=max_rel, atol=0)
    assert rel_err(C.grad, grad_ref) <= max_rel
    # The detached-plan ("envelope") gradient is the wrong gradient for <T*, C>: far off, not rounding.
    assert rel_err(res.plan * W.to(dtype)[:, None, None], grad_ref) > 0.1


@pytest.mark.parametrize("dtype, tol, max_rel", [(torch.float64, 1e-13, 1e-8), (torch.float32, None, 1e-4)])
def test_regularized_grad_matches_unrolled_float64(dtype, tol, max_rel):
    C64, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    value_ref, grad_ref = ref_value_and_grad(0.1, True, "regularized")
    C = C64.to(dtype).requires_grad_()
    value, res = ot_loss(C, a_mask, b_mask, 0.1, "regularized", tol=tol, max_iter=5000)
    (value * W.to(dtype)).sum().backward()
    torch.testing.assert_close(value.double(), value_ref, rtol=max_rel, atol=0)
    assert rel_err(C.grad, grad_ref) <= max_rel
    # envelope theorem: the gradient is the plan itself
    torch.testing.assert_close(C.grad, res.plan * W.to(dtype)[:, None, None])


def test_linear_gradcheck_tiny():
    # finite differences on a tiny fully converged float64 problem, padding included
    g = torch.Generator().manual_seed(3)
    C = torch.rand(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    b_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    fn = lambda c: ot_loss(c, a_mask, b_mask, 0.2, tol=1e-14, max_iter=10000)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (C,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_unconverged_peaked_problems_give_finite_gradients():
    """Training hits max_iter on peaked costs; the implicit backward must still return finite gradients."""
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 10.0, 100.0):
        S = torch.randn(16, 9, 7, generator=g) * scale
        C = (1 - torch.softmax(S, -1)).requires_grad_()  # (B, N, M) in [0, 1], near one-hot rows
        a = torch.ones(16, 9, dtype=torch.bool)
        b = torch.ones(16, 7, dtype=torch.bool)
        b[3:, 5:] = False
        loss, res = ot_loss(C, a, b, eps=0.01, max_iter=20)
        assert (res.n_iters == 20).any()  # some problems really did stop early
        loss.sum().backward()
        assert torch.isfinite(C.grad).all()


# ------------------------------------------------------------------ solver options: domain, over-relaxation


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("overrelax", [False, True])
def test_kernel_and_log_domains_agree(dtype, atol, overrelax):
    C, a_mask, b_mask = make_problem(dtype, peaked=True)
    tol = 1e-11 if dtype == torch.float64 else None
    res = {d: sinkhorn(C, a_mask, b_mask, 0.1, tol=tol, domain=d, overrelax=overrelax) for d in ("kernel", "log")}
    for r in res.values():
        assert (r.err <= (3e-11 if dtype == torch.float64 else 3e-5)).all(), r.err
    # L1 distance of the plans (total mass 1 each): both solved the same problem to tolerance
    l1 = (res["kernel"].plan.double() - res["log"].plan.double()).abs().sum((1, 2))
    assert (l1 <= atol * 10).all(), l1
    torch.testing.assert_close(res["kernel"].f, res["log"].f, rtol=0, atol=atol * 1e3)
    with pytest.raises(ValueError, match="domain"):
        sinkhorn(C, a_mask, b_mask, 0.1, domain="exp")


def plain(C, a_mask, b_mask, eps, **kw):
    """Textbook Sinkhorn at eps from a cold start: no eps-scaling, no Newton (the reference the fast paths
    must agree with)."""
    return sinkhorn(C, a_mask, b_mask, eps, eps_scaling=False, newton=False, **kw)


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_scaling_and_newton_reach_the_plain_plan_and_gradient_float64(eps):
    # masked, N != M: eps-scaling + Newton must land on the same fixed point as plain Sinkhorn, and the
    # implicit gradient computed from either plan must agree. (Smaller eps: plain Sinkhorn needs > 200,000
    # iterations to reach 1e-13 on these peaked costs, measured at 0.01.)
    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    fast = sinkhorn(C, a_mask, b_mask, eps, tol=1e-13, max_iter=20000)
    ref = plain(C, a_mask, b_mask, eps, tol=1e-13, max_iter=200000)
    assert fast.converged.all() and ref.converged.all()
    assert (fast.plan - ref.plan).abs().sum((1, 2)).max() <= 1e-10
    assert (fast.n_iters < ref.n_iters).all(), (fast.n_iters, ref.n_iters)  # and it is the faster path
    grads = []
    for kw in ({}, {"eps_scaling": False, "newton": False, "max_iter": 200000}):
        Cg = C.clone().requires_grad_()
        loss, _ = ot_loss(Cg, a_mask, b_mask, eps, tol=1e-13, **({"max_iter": 20000} | kw))
        (loss * W).sum().backward()
        grads.append(Cg.grad)
    assert rel_err(grads[0], grads[1]) <= 1e-10


def test_newton_alone_matches_sinkhorn_alone():
    # each accelerator on its own: Newton without eps-scaling, eps-scaling without Newton
    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    ref = plain(C, a_mask, b_mask, 0.05, tol=1e-12, max_iter=100000)
    for kw in ({"eps_scaling": False}, {"newton": False}):
        res = sinkhorn(C, a_mask, b_mask, 0.05, tol=1e-12, max_iter=20000, **kw)
        assert res.converged.all() and (res.plan - ref.plan).abs().sum((1, 2)).max() <= 1e-9, kw


def test_huge_cost_spread_is_solved_safely():
    # (max C - min C) / eps = 2e5: textbook kernel Sinkhorn underflows to 0 / NaN; the absorbed kernel (every
    # row and column maximum shifted to 1) and eps-scaling stay finite and agree with the log domain
    g = torch.Generator().manual_seed(5)
    C = torch.rand(2, 23, 19, generator=g) * 1e4
    m_a, m_b = torch.ones(2, 23, dtype=torch.bool), torch.ones(2, 19, dtype=torch.bool)
    res = sinkhorn(C, m_a, m_b, 0.05)
    ref = sinkhorn(C.double(), m_a, m_b, 0.05, tol=1e-12, domain="log")
    assert res.converged.all() and torch.isfinite(res.plan).all() and (res.err <= 2e-5).all()
    assert (res.plan.double() - ref.plan).abs().sum((1, 2)).max() <= 1e-4


def test_broken_kernel_stage_is_redone_in_the_log_domain(monkeypatch):
    # a kernel whose products go non-finite (simulated: NaN in sequence 1's kernel) must not leak: that
    # sequence redoes the stage in the log domain and ends at the same plan as a clean solve
    import pipeline.losses.sinkhorn as sk

    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    clean = sinkhorn(C, a_mask, b_mask, 0.05, tol=1e-10)
    real = sk._Kernel.build
    calls = []

    def poisoned(Z, log):
        kern = real(Z, log)
        if not log and not calls and len(kern.K) == B:
            kern.K[1, 0, 0] = kern.Kt[1, 0, 0] = float("nan")
        calls.append(("log" if log else "kernel", len(Z)))  # (domain, sequences in the stage)
        return kern

    monkeypatch.setattr(sk._Kernel, "build", staticmethod(poisoned))
    res = sinkhorn(C, a_mask, b_mask, 0.05, tol=1e-10)
    # the poisoned sequence alone was redone in the log domain; the other two finished in the kernel domain
    assert [c for c in calls if c[0] == "log"] == [("log", 1)], calls
    assert res.converged.all() and torch.isfinite(res.plan).all()
    assert (res.plan - clean.plan).abs().sum((1, 2)).max() <= 1e-8


def test_warm_start_converges_at_once_to_the_same_plan():
    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    cold = sinkhorn(C, a_mask, b_mask, 0.02, tol=1e-12)
    warm = sinkhorn(C, a_mask, b_mask, 0.02, tol=1e-10, init=(cold.f, cold.g))
    assert (warm.n_iters == 0).all(), warm.n_iters  # already within tol: no iteration at all
    assert (warm.plan - cold.plan).abs().sum((1, 2)).max() <= 1e-11
    # a nearby problem (the cost after a small training step) starts from the old potentials
    C2 = C + 1e-3 * torch.randn(C.shape, generator=torch.Generator().manual_seed(1), dtype=C.dtype)
    ref = sinkhorn(C2, a_mask, b_mask, 0.02, tol=1e-12)
    near = sinkhorn(C2, a_mask, b_mask, 0.02, tol=1e-12, init=(cold.f, cold.g))
    assert near.converged.all() and (near.plan - ref.plan).abs().sum((1, 2)).max() <= 1e-10


def test_relative_eps_is_invariant_to_the_scale_of_the_cost():
    # eps_scale="std": eps x std(C) per sequence, so an affine change of C (scale and shift) leaves the plan
    # unchanged, as it would not with an absolute eps
    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    _, r1 = ot_loss(C, a_mask, b_mask, 0.5, eps_scale="std", tol=1e-12)
    _, r2 = ot_loss(7 * C + 3, a_mask, b_mask, 0.5, eps_scale="std", tol=1e-12)
    _, r3 = ot_loss(7 * C + 3, a_mask, b_mask, 0.5, tol=1e-12)
    assert (r1.plan - r2.plan).abs().sum((1, 2)).max() <= 1e-9
    assert (r1.plan - r3.plan).abs().sum((1, 2)).max() > 1e-2
    from pipeline.losses.implicit import relative_eps

    std = torch.stack([C[i][a_mask[i]][:, b_mask[i]].std() for i in range(B)])
    torch.testing.assert_close(relative_eps(C, a_mask, b_mask, 0.5), 0.5 * std)
    with pytest.raises(ValueError, match="eps_scale"):
        ot_loss(C, a_mask, b_mask, 0.5, eps_scale="mean")


def test_overrelaxation_saves_iterations_and_finds_the_same_plan():
    # a slow problem: 1 - rowsoftmax costs of the benchmark's kind at a small eps
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 2, 96, 16, generator=g, dtype=torch.float64)
    C = 1 - (x @ y.transpose(1, 2) / 2).softmax(-1)  # (2, 96, 96)
    m = torch.ones(2, 96, dtype=torch.bool)
    slow = plain(C, m, m, 0.05, tol=1e-9, max_iter=20000, overrelax=False)  # 400 and 860 iterations
    fast = plain(C, m, m, 0.05, tol=1e-9, max_iter=20000, overrelax=True)
    assert (fast.err <= 1e-9).all() and (slow.err <= 1e-9).all()
    assert (fast.n_iters * 3 <= slow.n_iters).all(), (fast.n_iters, slow.n_iters)
    assert (fast.plan - slow.plan).abs().sum((1, 2)).max() <= 1e-8


def test_overrelaxation_backs_off_when_it_diverges(monkeypatch):
    # force a wildly unstable omega: the solver must notice the error growing, return to its last checked
    # state and still converge to the plain Sinkhorn plan
    import pipeline.losses.sinkhorn as sk

    monkeypatch.setattr(sk, "OMEGA_MAX", 10.0)
    monkeypatch.setattr(sk, "_young_omega", lambda mu2: torch.full_like(mu2, 3.0))
    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    res = plain(C, a_mask, b_mask, 0.05, tol=1e-10, max_iter=5000)
    ref = plain(C, a_mask, b_mask, 0.05, tol=1e-10, max_iter=5000, overrelax=False)
    assert torch.isfinite(res.plan).all() and (res.err <= 1e-10).all()
    assert (res.plan - ref.plan).abs().sum((1, 2)).max() <= 1e-8


def test_check_every_only_changes_where_sequences_stop():
    C, a_mask, b_mask = make_problem(torch.float64, peaked=True)
    for k in (1, 7):
        res = plain(C, a_mask, b_mask, 0.1, tol=1e-10, check_every=k, overrelax=False)
        assert (res.n_iters % k == 0).all() and (res.err <= 1e-10).all()


def test_autocast_does_not_reach_the_solver():
    # Trainer's bf16 autocast would run the kernel-domain bmm and the CG solve in bf16; the solver opts out
    C, a_mask, b_mask = make_problem(torch.float32, peaked=True)
    C.requires_grad_()
    ref, _ = ot_loss(C, a_mask, b_mask, 0.1)
    (g_ref,) = torch.autograd.grad(ref.sum(), C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, res = ot_loss(C, a_mask, b_mask, 0.1)
        (g,) = torch.autograd.grad(got.sum(), C)
    assert res.plan.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_refuses_integer_masks_and_nonpositive_eps():
    # an integer mask would make ~mask -1 / -2 and & a bitwise and: garbage marginals, no error
    C, a_mask, b_mask = make_problem(torch.float64)
    for fn in (sinkhorn, ot_loss):
        with pytest.raises(TypeError, match="a_mask must be a bool tensor"):
            fn(C, a_mask.long(), b_mask, 0.1)
        with pytest.raises(TypeError, match="b_mask must be a bool tensor"):
            fn(C, a_mask, b_mask.to(torch.uint8), 0.1)
        for eps in (0.0, -0.1, float("nan")):  # C / eps: inf or NaN plans, or a maximised objective
            with pytest.raises(ValueError, match="eps must be > 0"):
                fn(C, a_mask, b_mask, eps)


def test_long_sharp_sequence_converges_to_its_own_plan():
    # Regression (bench, N = 2048, eps = 0.01): Newton's step on a column with far too little mass diverged,
    # the scalings overflowed the rebuilt plan to zeros, and the result still said converged. Now steps are
    # capped, and "converged" is checked on the returned plan itself.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 2048, 64, generator=g, dtype=torch.float64)[:1]  # the bench's sequence 0
    Y = torch.randn(4, 2048, 64, generator=g, dtype=torch.float64)[:1]
    P = torch.randn(64, 64, generator=g, dtype=torch.float64) * (2 / 8)
    C = (1 - (X @ (Y @ P).transpose(1, 2) / 8).softmax(-1)).float()  # (1, 2048, 2048)
    m = torch.ones(1, 2048, dtype=torch.bool)
    res = sinkhorn(C, m, m, 0.01)
    assert res.converged.all() and (res.err <= 2e-5).all(), (res.err, res.n_iters)
    torch.testing.assert_close(res.plan.sum().double(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-4)

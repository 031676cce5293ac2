"""The paired statistics of the ablation report (pipeline/stats.py) against cases worked out by hand, and the
report's paired entries built from them."""

import json
import math

import numpy as np
import pytest

from pipeline.report import _delta, compare, paired
from pipeline.stats import paired_bootstrap, sign_test, verdict

# ---- paired_bootstrap -----------------------------------------------------------------------------------------


def test_bootstrap_of_equal_differences_collapses_to_them():
    mean, lo, hi = paired_bootstrap([0.25] * 5)
    assert (mean, lo, hi) == pytest.approx((0.25, 0.25, 0.25), abs=1e-15)


def test_bootstrap_of_three_seeds_is_their_range():
    """Resampling one seed thrice has probability 1/27 = 3.7% > 2.5% per end, so the 95% percentile interval of 3
    differences is [min, max] (with 10 000 resamples ~370 land on each end, far more than the 250 needed)."""
    mean, lo, hi = paired_bootstrap([0.1, 0.6, 0.2])
    assert mean == pytest.approx(0.3) and lo == pytest.approx(0.1) and hi == pytest.approx(0.6)


def test_bootstrap_of_two_values_spans_both():
    # the resample means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: both 2.5% tails sit on the ends
    assert paired_bootstrap([0.0, 1.0]) == pytest.approx((0.5, 0.0, 1.0))


def test_bootstrap_of_a_large_normal_sample_matches_the_normal_interval():
    """For n = 200 the mean is close to normal: mean ± 1.96 sd / sqrt(n). The quantiles of 10 000 resamples
    are off by ~1.4% of the half-width (their standard error), so 6% fails a wrong level (90%: -16%) or a
    wrong scale (sd instead of sd / sqrt(n))."""
    x = np.random.default_rng(123).normal(0.3, 2.0, 200)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    mean, lo, hi = paired_bootstrap(x)
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.06 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.06 * half)
    # a lower level narrows it: 1.645 / 1.96 of the width at 90%
    _, lo90, hi90 = paired_bootstrap(x, level=0.90)
    assert (hi90 - lo90) / (2 * half) == pytest.approx(1.645 / 1.96, abs=0.06)


def test_bootstrap_is_reproducible_and_its_seed_matters():
    d = [0.03, -0.01, 0.05, 0.02, 0.04, -0.02]
    assert paired_bootstrap(d) == paired_bootstrap(list(d))
    assert paired_bootstrap(d, seed=7) == paired_bootstrap(d, seed=7)
    assert paired_bootstrap(d, seed=7)[1:] != paired_bootstrap(d, seed=8)[1:]


def test_bootstrap_drops_missing_values():
    d = [0.1, 0.6, 0.2]
    assert paired_bootstrap([None, 0.1, float("nan"), 0.6, 0.2]) == paired_bootstrap(d)


@pytest.mark.parametrize("diffs, mean", [([], None), ([None, float("nan")], None), ([0.4], 0.4), ([None, 0.4], 0.4)])
def test_bootstrap_needs_two_values(diffs, mean):
    m, lo, hi = paired_bootstrap(diffs)
    assert math.isnan(lo) and math.isnan(hi)
    assert math.isnan(m) if mean is None else m == mean


def test_bootstrap_rejects_a_level_outside_0_1():
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0, 2.0], level=95)


# ---- sign_test ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "diffs, p",
    [
        ([1.0] * 10, 2 / 1024),  # all 10 positive: 2 * 1/2**10
        ([-0.5] * 10, 2 / 1024),
        ([1.0] * 8 + [-1.0] * 2, 2 * (45 + 10 + 1) / 1024),  # 2 (C(10,8) + C(10,9) + C(10,10)) / 2**10
        ([-1.0] * 8 + [2.0] * 2, 2 * (45 + 10 + 1) / 1024),
        ([0.1, 0.2, 0.3], 2 / 8),  # the best 3 seeds can do
        ([1.0] * 9 + [-1.0] * 3, 2 * (220 + 66 + 12 + 1) / 4096),  # 2 (C(12,9) + ... + C(12,12)) / 2**12
        ([1.0] * 5 + [-1.0] * 5, 1.0),  # 2 * 638/1024 > 1: capped
        ([1.0, -1.0, 1.0], 1.0),  # 2 (C(3,0) + C(3,1)) / 8
        ([0.2], 1.0),
    ],
)
def test_sign_test_is_the_exact_binomial(diffs, p):
    assert sign_test(diffs) == pytest.approx(p, rel=1e-12)


def test_sign_test_drops_ties_and_missing_values():
    assert sign_test([0.1, 0.2, 0.3, 0.0, 0.0, None, float("nan")]) == pytest.approx(2 / 8)
    assert sign_test([0.0, 0.0, 0.0]) == 1.0
    assert sign_test([]) == 1.0


# ---- verdict --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo, hi, lower_is_better, expected",
    [
        (-0.05, -0.01, True, "better"),  # KL went down
        (-0.05, -0.01, False, "worse"),  # accuracy went down
        (0.01, 0.05, True, "worse"),
        (0.01, 0.05, False, "better"),
        (-0.01, 0.02, True, "no difference"),
        (-0.01, 0.02, False, "no difference"),
        (0.0, 0.1, False, "no difference"),  # touching 0 is containing it
        (-0.1, 0.0, True, "no difference"),
        (float("nan"), float("nan"), True, "no difference"),
        (None, None, False, "no difference"),
    ],
)
def test_verdict(lo, hi, lower_is_better, expected):
    assert verdict(lo, hi, lower_is_better) == expected


# ---- the report's paired entries ------------------------------------------------------------------------------


def test_paired_entry_keeps_the_seeds_and_reads_the_metric_direction():
    ref = [{"accuracy": 0.5, "kl_teacher": 0.30, "entropy": 0.5}, {"accuracy": 0.2, "kl_teacher": 0.40}] + [
        {"accuracy": 0.7, "kl_teacher": 0.20, "entropy": 0.5}
    ]
    runs = [{"accuracy": 0.6, "kl_teacher": 0.25, "entropy": 0.7}, {"accuracy": 0.25, "kl_teacher": 0.30}] + [
        {"accuracy": 0.72, "kl_teacher": None, "entropy": 0.4}
    ]
    acc = paired(runs, ref, "accuracy")
    assert acc["per_seed"] == pytest.approx([0.1, 0.05, 0.02])
    assert (acc["n"], acc["lo"], acc["hi"]) == (3, pytest.approx(0.02), pytest.approx(0.1))
    assert acc["mean"] == pytest.approx(0.17 / 3) and acc["p_sign"] == 0.25 and acc["verdict"] == "better"
    kl = paired(runs, ref, "kl_teacher")  # lower is better; seed 2 has no value: 2 pairs
    assert kl["per_seed"][2] is None and kl["per_seed"][:2] == pytest.approx([-0.05, -0.1])
    assert (kl["n"], kl["lo"], kl["hi"], kl["p_sign"], kl["verdict"]) == (
        2,
        pytest.approx(-0.1),
        pytest.approx(-0.05),
        0.5,
        "better",
    )
    ent = paired(runs, ref, "entropy")  # no direction; one seed missing from the reference
    assert ent["per_seed"][1] is None and ent["verdict"] == "—"
    none = paired(runs, ref, "kl_true")  # recorded by no run
    assert none == {
        "per_seed": [None] * 3,
        "n": 0,
        "mean": None,
        "std": None,
        "lo": None,
        "hi": None,
        "p_sign": None,
        "verdict": "—",
    }
    json.dumps([acc, kl, ent, none], allow_nan=False)  # strict JSON: no NaN anywhere


def test_a_metric_some_runs_record_is_paired_one_no_run_records_is_left_out():
    ref = [{"accuracy": 0.5, "kl_true": 0.3}, {"accuracy": 0.4}]
    runs = {"a": [{"accuracy": 0.6, "kl_true": 0.2}, {"accuracy": 0.5, "kl_true": 0.1}], "b": [{"accuracy": 0.5}] * 2}
    got = compare(runs, ref, "paired_vs_reference")
    assert set(got["a"]) == {"accuracy", "kl_true", "paired_vs_reference"}  # no perplexity: nobody records it
    assert set(got["a"]["paired_vs_reference"]) == {"accuracy", "kl_true"}
    assert got["a"]["kl_true"]["per_seed"] == [0.2, 0.1]  # the variant's own per-seed values
    assert got["a"]["paired_vs_reference"]["kl_true"]["per_seed"] == pytest.approx([-0.1, None])
    assert got["b"]["kl_true"] == {"per_seed": [None, None], "mean": None, "std": None}
    assert got["b"]["paired_vs_reference"]["accuracy"]["verdict"] == "no difference"  # +0.0 and +0.1


def test_paired_cell():
    p = {"mean": -0.031, "lo": -0.052, "hi": -0.012, "p_sign": 0.002, "verdict": "better"}
    assert _delta(p, ".3f") == "−0.031 [−0.052, −0.012] p=0.002 better"
    assert _delta(p | {"p_sign": 2 / 1024}, ".3f").endswith(" p=0.002 better")
    assert _delta(p | {"p_sign": 2 / 4096}, ".3f").endswith(" p<0.001 better")
    assert _delta({"mean": 0.1, "lo": None, "hi": None, "p_sign": 1.0, "verdict": "no difference"}, ".1f", 100) == (
        "+10.0 [—, —] p=1.000 no difference"
    )
    assert _delta({"mean": None}, ".3f") == _delta(None, ".3f") == "—"

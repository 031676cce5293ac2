"""The ablation's report: mean ± std over seeds, per-seed values, paired differences, gap closed, plots.

Paired differences compare each variant with the baseline at the SAME seed (same initial weights and batch
order), which removes most of the seed-to-seed spread. Per metric, a paired entry keeps the per-seed differences,
their mean, a 95% percentile bootstrap interval over seeds, the exact sign test's p and a verdict (better / worse
/ no difference: whether the interval excludes 0, read in the metric's direction); pipeline/stats.py has the
statistics. The gap closed is the share of the baseline -> teacher accuracy gap a variant's mean accuracy covers.

Bits per character is the likelihood to compare across tokenizers (perplexity counts each model's own tokens).
A missing value (null, or NaN in an older file: the cache metrics of a student with another tokenizer than the
teacher's; a metric an older run did not record) is left out of means and differences and shown as "—"; a metric
no run of a section records is left out of that section.
"""

import json
import math
import statistics
from pathlib import Path

from pipeline.ablation import METRICS, AblationConfig, AblationError, run_dir, teacher_json
from pipeline.stats import paired_bootstrap, sign_test, verdict
from pipeline.versions import versions, versions_line

# kl_true: KL from the true distribution, where a task knows it; val_nll, transition_step: from the runs' evaluations
STATS = (*METRICS, "kl_true", "val_nll", "transition_step")
PAIRED = ("accuracy", "top1_agreement", "perplexity", "bits_per_char", "kl_teacher", "kl_true", "entropy", "val_nll")
# True: lower is better. Entropy has no better side (a sharper student is not a better one); any metric not named
# here has no direction either: its paired entry says "—" rather than guess.
LOWER_IS_BETTER = {
    "accuracy": False,
    "top1_agreement": False,
    "perplexity": True,
    "bits_per_char": True,
    "kl_teacher": True,
    "kl_true": True,
    "val_nll": True,
}
N_RESAMPLES, LEVEL, BOOT_SEED = 10_000, 0.95, 0
CURVE_METRICS = ("kl_true", "bits_per_char", "accuracy")  # the data-efficiency curves' metrics, where recorded
DASH = "—"


def mean_std(xs) -> dict:
    """{"mean", "std"} of the values present (None = missing): the sample standard deviation (0 for a single
    value); both None when no value is."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def per_seed(runs: list[dict], metric: str) -> dict:
    """{"per_seed", "mean", "std"} of one metric over runs (one per seed; None where a run has no value)."""
    xs = [r.get(metric) for r in runs]
    return {"per_seed": xs, **mean_std(xs)}


def _json_num(x: float):
    return None if math.isnan(x) else x  # ablation.json is strict JSON (DVC metrics): no NaN


def paired(runs: list[dict], ref: list[dict], metric: str) -> dict:
    """run - reference at the same seed, per metric: "per_seed" (the differences, None where either run has no
    value), "n" (how many), "mean", "std", the bootstrap interval "lo", "hi", the sign test's "p_sign" and the
    "verdict" ("—" for a metric without a direction or without a pair; interval and p None without enough)."""
    pairs = [(r.get(metric), b.get(metric)) for r, b in zip(runs, ref)]
    diffs = [None if a is None or b is None else a - b for a, b in pairs]
    n = sum(d is not None for d in diffs)
    _, lo, hi = paired_bootstrap(diffs, N_RESAMPLES, LEVEL, BOOT_SEED)
    lower = LOWER_IS_BETTER.get(metric)
    return {
        "per_seed": diffs,
        "n": n,
        **mean_std(diffs),
        "lo": _json_num(lo),
        "hi": _json_num(hi),
        "p_sign": sign_test(diffs) if n else None,
        "verdict": DASH if lower is None or not n else verdict(lo, hi, lower),
    }


def gap_closed(runs: list[dict], base: list[dict], floor: float | list[dict], metric: str) -> dict:
    """Per seed, the share of the baseline's gap to `floor` (the teacher's value of a lower-is-better metric, or a
    reference run per seed) that a run closes, (base - run) / (base - floor); its mean with the bootstrap interval
    over seeds. A seed whose baseline is not above the floor has no gap to close (None)."""
    floors = [f.get(metric) for f in floor] if isinstance(floor, list) else [floor] * len(runs)
    per = [
        None
        if r.get(metric) is None or b.get(metric) is None or f is None or b[metric] <= f
        else (b[metric] - r[metric]) / (b[metric] - f)
        for r, b, f in zip(runs, base, floors)
    ]
    _, lo, hi = paired_bootstrap(per, N_RESAMPLES, LEVEL, BOOT_SEED)
    return {"per_seed": per, **mean_std(per), "lo": _json_num(lo), "hi": _json_num(hi)}


def recorded(groups, metrics) -> list[str]:
    """The metrics (in their order) that at least one run of the groups (lists of runs) records, even as null:
    one no run has heard of is left out of the section rather than shown as a column of "—"."""
    keys = {k for runs in groups for r in runs for k in r}
    return [m for m in metrics if m in keys]


def paired_stats(n_seeds: int) -> dict:
    """How the paired entries were computed, for the JSON (and what n seeds can show at best)."""
    return {
        "interval": f"{LEVEL:.0%} percentile bootstrap of the mean difference, seeds resampled with replacement",
        "n_resamples": N_RESAMPLES,
        "bootstrap_seed": BOOT_SEED,
        "test": "exact two-sided sign test over the non-zero differences",
        "smallest_p": 2 / 2**n_seeds if n_seeds else None,
        "lower_is_better": LOWER_IS_BETTER,
    }


def _read(path: Path) -> dict:
    """A run's metrics; NaN (written by json.dumps for a missing value) is read as None, like null."""
    if not path.is_file():
        raise AblationError(f"missing ablation result {path}: run its stage first (dvc repro params/ablation/dvc.yaml)")
    return json.loads(path.read_text(), parse_constant=lambda _: None)  # NaN, Infinity, -Infinity


def compare(runs: dict[str, list[dict]], ref: list[dict], key: str) -> dict:
    """Per variant: mean ± std and per-seed values of every metric the section records, and under `key` the
    paired entry of each such metric against `ref` (the reference's runs, one per seed)."""
    stats = recorded([*runs.values(), ref], STATS)
    pairs = [m for m in stats if m in PAIRED]  # train_seconds is a cost, not paired
    return {
        v: {**{m: per_seed(rs, m) for m in stats}, key: {m: paired(rs, ref, m) for m in pairs}}
        for v, rs in runs.items()
    }


def summarise(abl: AblationConfig) -> dict:
    """Every run's metrics gathered into per-variant statistics, paired differences and gap closed."""
    tasks = {}
    for task in abl.tasks:
        teacher = _read(teacher_json(abl, task))
        runs = {v: [_read(run_dir(abl, task, v, s) / "metrics.json") for s in abl.seeds] for v in abl.variants}
        base = runs[abl.baseline]
        base_acc = mean_std(r.get("accuracy") for r in base)["mean"]
        gap = None if base_acc is None else teacher["accuracy"] - base_acc
        variants = compare(runs, base, "paired_vs_baseline")
        for s in variants.values():
            acc = s.get("accuracy", {}).get("mean")
            s["gap_closed"] = (acc - base_acc) / gap if gap is not None and gap > 0 and acc is not None else None
        if teacher.get("kl_true") is not None:  # the positive control: the gap in the exact metric, seed by seed
            for v, s in variants.items():
                s["gap_closed_kl_true"] = gap_closed(runs[v], base, teacher["kl_true"], "kl_true")
        tasks[task] = {"teacher": teacher, "variants": variants}
    de = abl.data_efficiency
    curves = {}
    for v in de.variants:
        points = []
        for f in [*de.fractions, 1.0]:
            rs = [_read(run_dir(abl, de.task, v, s, f) / "metrics.json") for s in abl.seeds]
            points.append({"fraction": f, **{m: per_seed(rs, m) for m in recorded([rs], CURVE_METRICS)}})
        curves[v] = points
    sw, ex = abl.sweep, abl.exact_teacher
    xt = abl.cross_tokenizer
    cross = {}
    if xt.variants:
        runs = {v: [_read(run_dir(abl, xt.task, v, s) / "metrics.json") for s in abl.seeds] for v in xt.variants}
        got = compare(runs, runs[xt.baseline], "paired_vs_baseline")
        same = [_read(run_dir(abl, xt.task, xt.reference, s) / "metrics.json") for s in abl.seeds]
        cross = {
            v: {
                "overrides": xt.variants[v],
                **got[v],
                "gap_closed_bpc": gap_closed(runs[v], runs[xt.baseline], same, "bits_per_char"),
            }
            for v in runs
        }
    return {
        "seeds": abl.seeds,
        "baseline": abl.baseline,
        "variants": abl.variants,
        "paired_stats": paired_stats(len(abl.seeds)),
        "tasks": tasks,
        "data_efficiency": {"task": de.task, "curves": curves},
        "sweep": {
            "task": sw.task,
            "reference": sw.reference,
            "settings": settings(abl, sw.task, sw.reference, sw.variants),
        },
        "exact_teacher": {
            "task": ex.task,
            "reference": ex.reference,
            "codecs": ex.codecs,
            "settings": settings(abl, ex.task, ex.reference, ex.variants),
        },
        "cross_tokenizer": {"task": xt.task, "baseline": xt.baseline, "reference": xt.reference, "variants": cross},
    }


def settings(abl: AblationConfig, task: str, reference: str, variants: dict) -> dict:
    """Per setting (a sweep's, the exact teacher's): its overrides, statistics and paired difference to the
    reference variant."""
    if not variants:
        return {}
    ref = [_read(run_dir(abl, task, reference, s) / "metrics.json") for s in abl.seeds]
    runs = {v: [_read(run_dir(abl, task, v, s) / "metrics.json") for s in abl.seeds] for v in variants}
    got = compare(runs, ref, "paired_vs_reference")
    return {v: {"overrides": over, **got[v]} for v, over in variants.items()}


def _num(x, fmt: str) -> str:
    return DASH if x is None else format(x, fmt)


def _pm(stat: dict | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    """ "mean ± std" (both x scale, then suffix), "—" when no seed has a value or the metric is not recorded."""
    if not stat or stat["mean"] is None:
        return DASH
    return f"{format(scale * stat['mean'], fmt)} ± {format(scale * stat['std'], fmt)}{suffix}"


def _signed(x, fmt: str, scale: float) -> str:
    return DASH if x is None else format(scale * x, "+" + fmt).replace("-", "−")


def _delta(p: dict | None, fmt: str, scale: float = 1.0) -> str:
    """A paired entry as "−0.031 [−0.052, −0.012] p=0.002 better" (mean and interval x scale); "—" without a
    pair."""
    if not p or p["mean"] is None:
        return DASH
    pv = "p<0.001" if p["p_sign"] < 0.001 else f"p={p['p_sign']:.3f}"
    lo, hi = _signed(p["lo"], fmt, scale), _signed(p["hi"], fmt, scale)
    return f"{_signed(p['mean'], fmt, scale)} [{lo}, {hi}] {pv} {p['verdict']}"


def _table(first: str, rows: dict, cols: list) -> list[str]:
    """Markdown lines of a table: a row per entry of `rows` (its name under `first`), then one cell per column
    (header, cell(entry), right-aligned)."""
    lines = [
        "| " + " | ".join([first, *(h for h, _, _ in cols)]) + " |",
        "|---|" + "".join("---:|" if right else "---|" for *_, right in cols),
    ]
    return lines + ["| " + " | ".join([name, *(cell(e) for _, cell, _ in cols)]) + " |" for name, e in rows.items()]


def _mean(header: str, metric: str, fmt: str, scale: float = 1.0, suffix: str = "") -> tuple:
    return header, lambda s: _pm(s.get(metric), fmt, scale, suffix), True


def _paired(header: str, key: str, metric: str, fmt: str, scale: float = 1.0) -> tuple:
    return header, lambda s: _delta(s[key].get(metric), fmt, scale), True


def _seeds(metric: str) -> tuple:
    return "per seed", lambda s: " / ".join(_num(x, ".1%") for x in (s.get(metric) or {}).get("per_seed", [])), False


def _overrides(default: str = "") -> tuple:
    return "overrides", lambda s: ", ".join(f"{k}={x}" for k, x in s["overrides"].items()) or default, False


def _kl_true(rows: dict, key: str) -> list:
    """The KL(true‖student) columns, for the sections whose runs record it (and the gap closed, where computed)."""
    if not any("kl_true" in s for s in rows.values()):
        return []
    cols = [_mean("KL(true‖student)", "kl_true", ".4f"), _paired("paired Δ KL true", key, "kl_true", ".4f")]
    if any("gap_closed_kl_true" in s for s in rows.values()):
        cols.append(("gap closed (KL true)", lambda s: _interval(s.get("gap_closed_kl_true"), ".1%"), True))
    return cols


def _interval(stat: dict | None, fmt: str) -> str:
    """mean [lo, hi], or "—" without a value."""
    if not stat or stat.get("mean") is None:
        return DASH
    return f"{stat['mean']:{fmt}} [{_num(stat.get('lo'), fmt)}, {_num(stat.get('hi'), fmt)}]"


def _evaluations(rows: dict, key: str) -> list:
    """The columns from the runs' evaluations during training, for the sections whose runs have them."""
    if not any((s.get("val_nll") or {}).get("mean") is not None for s in rows.values()):
        return []
    cols = [_mean("val NLL (last evals)", "val_nll", ".4f"), _paired("paired Δ val NLL", key, "val_nll", ".4f")]
    if any("transition_step" in s for s in rows.values()):
        cols.append(("first step ≥ 50% accuracy (per seed)", _transition_steps, False))
    return cols


def _transition_steps(s: dict) -> str:
    """Per seed, the first evaluation step with half the curve's answers right; "—" = not within the run."""
    return " / ".join(DASH if x is None else str(x) for x in s["transition_step"]["per_seed"])


def _legend(seeds: list[int], reference: str) -> str:
    """The line above the tables: how to read a paired cell, and what this many seeds can show at best."""
    n = len(seeds)
    return (
        f"Seeds {seeds}; ± is the sample std over seeds. A paired Δ is the per-seed difference to "
        f"{reference} (same init and batch order): mean [{LEVEL:.0%} percentile bootstrap interval over seeds], "
        "p of the exact two-sided sign test, and the verdict (better / worse when the interval excludes 0, in the "
        f"metric's direction; — without one). Accuracy Δ in points. With {n} seeds p cannot go below "
        f"{2 / 2**n:.3g} and the interval is about the range of the differences: a verdict needs every seed to "
        "agree. The JSON has every metric's per-seed differences."
    )


def markdown(summary: dict) -> str:
    """The report as Markdown tables: per task, mean ± std over seeds, per-seed accuracy, paired difference."""
    key = "paired_vs_baseline"
    lines = [_legend(summary["seeds"], f"`{summary['baseline']}`"), ""]
    for task, t in summary["tasks"].items():
        te = t["teacher"]
        bpc = "" if te.get("bits_per_char") is None else f", {te['bits_per_char']:.4f} bits per character"
        lines += [
            f"### {task}: teacher accuracy {te['accuracy']:.1%}, perplexity {te['perplexity']:.3f}{bpc}, "
            f"entropy {te['entropy']:.3f} nats per answer token",
            "",
            *_table(
                "variant",
                t["variants"],
                [
                    _mean("accuracy", "accuracy", ".1f", 100, "%"),
                    _seeds("accuracy"),
                    _paired("paired Δ accuracy", key, "accuracy", ".1f", 100),
                    ("gap closed", lambda s: _num(s["gap_closed"], ".0%"), True),
                    _mean("perplexity", "perplexity", ".3f"),
                    _mean("bits/char", "bits_per_char", ".4f"),
                    _paired("paired Δ bits/char", key, "bits_per_char", ".4f"),
                    _mean("KL(teacher‖student)", "kl_teacher", ".4f"),
                    _paired("paired Δ KL", key, "kl_teacher", ".4f"),
                    *_kl_true(t["variants"], key),
                    *_evaluations(t["variants"], key),
                    _mean("top-1 agreement", "top1_agreement", ".1f", 100, "%"),
                    _mean("train s", "train_seconds", ".0f"),
                ],
            ),
            "",
        ]
    lines += _data_efficiency_table(summary["data_efficiency"])
    lines += _settings_table(summary["sweep"], "sweep")
    ex = summary.get("exact_teacher") or {}
    if ex.get("settings"):
        codecs = ", ".join(f"{k} = {v}" for k, v in ex["codecs"].items())
        lines += _settings_table(
            ex,
            "exact teacher from the cached hidden states (full-vocabulary KL)"
            + (f"; hidden codecs {codecs}" if codecs else ""),
        )
    xt = summary.get("cross_tokenizer") or {}
    if xt.get("variants"):
        same = summary["tasks"][xt["task"]]["variants"]
        ref = xt.get("reference", summary["baseline"])
        lines += [
            "",
            f"### cross-tokenizer students ({xt['task']}): their own tokenizer, the teacher's cache, paired "
            f"with `{xt['baseline']}`",
            "",
            *(
                f"The same-tokenizer `{v}` student: accuracy {_pm(same[v].get('accuracy'), '.1f', 100, '%')}"
                f", bits/char {_pm(same[v].get('bits_per_char'), '.4f')}."
                for v in dict.fromkeys([summary["baseline"], ref])
            ),
            "Bits per character compare students across tokenizers (perplexity is per token of each student's own "
            f"tokenizer). Gap closed: (`{xt['baseline']}` - variant) / (`{xt['baseline']}` - same-tokenizer `{ref}`) "
            "in bits/char, seed by seed, mean [95% interval].",
            "",
            *_table(
                "variant",
                xt["variants"],
                [
                    _overrides("(the task's weights)"),
                    _mean("accuracy", "accuracy", ".1f", 100, "%"),
                    _seeds("accuracy"),
                    _paired("paired Δ accuracy", key, "accuracy", ".1f", 100),
                    _mean("bits/char", "bits_per_char", ".4f"),
                    _paired("paired Δ bits/char", key, "bits_per_char", ".4f"),
                    ("gap closed (bits/char)", lambda s: _interval(s.get("gap_closed_bpc"), ".1%"), True),
                    _mean("perplexity (own tokens)", "perplexity", ".3f"),
                    _mean("train s", "train_seconds", ".0f"),
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


def _data_efficiency_table(de: dict) -> list[str]:
    """Markdown lines of the data-efficiency curves (none when the ablation has no data-efficiency variants): one
    table per metric the runs record, mean ± std over seeds per share of the data."""
    if not de["curves"]:
        return []
    first = next(iter(de["curves"].values()))
    lines = [f"### data efficiency ({de['task']}): share of the training data at equal steps", ""]
    for metric, (label, fmt, scale, suffix) in DE_LABELS.items():
        if metric not in first[0]:
            continue
        lines += [
            f"| {label} | " + " | ".join(f"{p['fraction']:.0%} of the data" for p in first) + " |",
            "|---|" + "---:|" * len(first),
        ]
        for v, pts in de["curves"].items():
            lines.append(f"| {v} | " + " | ".join(_pm(p[metric], fmt, scale, suffix) for p in pts) + " |")
        lines.append("")
    return lines


DE_LABELS = {
    "kl_true": ("KL(true‖student)", ".4f", 1.0, ""),
    "bits_per_char": ("bits/char", ".4f", 1.0, ""),
    "accuracy": ("accuracy", ".1f", 100.0, "%"),
}


def _settings_table(sw: dict, title: str) -> list[str]:
    """Markdown lines of a settings table (the sweep, the exact teacher): each setting against its reference."""
    if not sw.get("settings"):
        return []
    key = "paired_vs_reference"
    return [
        "",
        f"### {title} ({sw['task']}): each setting against `{sw['reference']}`, paired by seed",
        "",
        *_table(
            "setting",
            sw["settings"],
            [
                _overrides(),
                _mean("accuracy", "accuracy", ".1f", 100, "%"),
                _seeds("accuracy"),
                _paired("paired Δ accuracy", key, "accuracy", ".1f", 100),
                _mean("bits/char", "bits_per_char", ".4f"),
                _paired("paired Δ bits/char", key, "bits_per_char", ".4f"),
                _mean("KL", "kl_teacher", ".4f"),
                _paired("paired Δ KL", key, "kl_teacher", ".4f"),
                *_kl_true(sw["settings"], key),
                _mean("train s", "train_seconds", ".0f"),
            ],
        ),
    ]


def _nan(x) -> float:
    return float("nan") if x is None else x


# (metric, label, scale): the panels of ablation.png; accuracy and kl_true only where some variant has them
PLOTTED = (
    ("bits_per_char", "bits/char", 1.0),
    ("kl_teacher", "KL(teacher‖student)", 1.0),
    ("accuracy", "accuracy (points)", 100.0),
    ("kl_true", "KL(true‖student)", 1.0),
)
VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red"}  # no difference, no direction: grey


def _paired_panel(ax, t: dict, baseline: str, metric: str, scale: float) -> None:
    """One panel of ablation.png: each variant's mean paired Δ to the baseline, its interval as the error bar,
    the per-seed differences as crosses, around a zero line."""
    names = [v for v in t["variants"] if v != baseline]  # the baseline against itself is 0 [0, 0]
    ax.axhline(0, color="k", lw=0.8)
    for k, v in enumerate(names):
        p = t["variants"][v]["paired_vs_baseline"].get(metric)
        if not p or p["mean"] is None:
            continue
        m, colour = scale * p["mean"], VERDICT_COLOURS.get(p["verdict"], "0.45")
        # max(0, ...): an interval of equal differences can miss their mean by a rounding error
        err = [[0.0], [0.0]] if p["lo"] is None else [[max(0, m - scale * p["lo"])], [max(0, scale * p["hi"] - m)]]
        ax.errorbar([k], [m], yerr=err, fmt="o", capsize=5, color=colour, zorder=2)
        ys = [scale * d for d in p["per_seed"] if d is not None]
        ax.scatter([k] * len(ys), ys, color="k", marker="x", s=14, lw=0.8, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")  # numeric x: an empty panel still draws
    ax.set_xlim(-0.5, len(names) - 0.5)
    if not ax.collections:  # no variant of the task has a value of the metric
        ax.text(0.5, 0.5, "no paired values", transform=ax.transAxes, ha="center", va="center", color="0.45")
        ax.set_yticks([])


def plot(summary: dict, out: Path, name: str = "ablation") -> None:
    """<name>.png (per task and metric, each variant's paired Δ to the baseline with its bootstrap interval) and
    <name>_data.png (the first of CURVE_METRICS the runs record vs. share of the data, error bars = std over
    seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, baseline = summary["tasks"], summary["baseline"]

    def present(metric: str) -> bool:
        return any(
            (s["paired_vs_baseline"].get(metric) or {}).get("mean") is not None
            for t in tasks.values()
            for s in t["variants"].values()
        )

    rows = [r for r in PLOTTED if r[0] in ("bits_per_char", "kl_teacher") or present(r[0])]
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(5.5 * len(tasks), 3.4 * len(rows)), squeeze=False)
    for j, (task, t) in enumerate(tasks.items()):
        for i, (metric, label, scale) in enumerate(rows):
            ax = axes[i][j]
            _paired_panel(ax, t, baseline, metric, scale)
            side = {True: "lower is better", False: "higher is better"}.get(LOWER_IS_BETTER.get(metric), "")
            ax.set_title(f"{task}: Δ {label} ({side})", fontsize=10)
    fig.suptitle(
        f"paired Δ to {baseline} over {len(summary['seeds'])} seeds: mean and {LEVEL:.0%} bootstrap interval\n"
        "(green better, red worse, grey no difference), x = one seed",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))  # room for the two-line suptitle
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)

    de = summary["data_efficiency"]
    if not de["curves"]:  # an ablation without data-efficiency runs draws no such figure
        return
    metric = next(m for m in CURVE_METRICS if m in next(iter(de["curves"].values()))[0])  # the first recorded
    label, _, scale, _ = DE_LABELS[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, pts in de["curves"].items():
        ax.errorbar(
            [p["fraction"] for p in pts],
            [_nan(p[metric]["mean"]) * scale for p in pts],
            yerr=[_nan(p[metric]["std"]) * scale for p in pts],
            marker="o",
            capsize=4,
            label=v,
        )
    ax.set_xscale("log")
    ax.set_xlabel("share of the training data (equal steps)")
    ax.set_ylabel(label + (" (%)" if scale == 100 else ""))
    ax.set_title(f"data efficiency ({de['task']}, {len(summary['seeds'])} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}_data.png", dpi=110)
    plt.close(fig)


def exact_teacher_report(abl: AblationConfig) -> dict:
    """Only the exact-teacher section, from its own runs and the task's reference and baseline students: writes
    <report>/ablation_exact.{json,md} (the whole report needs every run of every section)."""
    ex = abl.exact_teacher
    if not ex.variants:
        raise AblationError("exact_teacher.variants is empty: nothing to report")
    against_ref = settings(abl, ex.task, ex.reference, ex.variants)
    against_base = settings(abl, ex.task, abl.baseline, {ex.reference: abl.variants[ex.reference], **ex.variants})
    summary = {
        "seeds": abl.seeds,
        "task": ex.task,
        "codecs": ex.codecs,
        "paired_stats": paired_stats(len(abl.seeds)),
        "vs_reference": {"task": ex.task, "reference": ex.reference, "settings": against_ref},
        "vs_baseline": {"task": ex.task, "reference": abl.baseline, "settings": against_base},
    }
    codecs = ", ".join(f"{k} = {v}" for k, v in ex.codecs.items())
    text = (
        "\n".join(
            [
                _legend(abl.seeds, "the table's reference")
                + f" Hidden codecs of the extra caches: {codecs or 'none'}.",
                *_settings_table(summary["vs_reference"], "exact teacher against the top-k KL"),
                *_settings_table(summary["vs_baseline"], "the same students against CE only"),
            ]
        )
        + "\n"
    )
    out = Path(abl.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation_exact.json").write_text(json.dumps({**summary, "versions": versions()}, indent=2, allow_nan=False))
    (out / "ablation_exact.md").write_text(f"{text}\n{versions_line()}\n")
    print(text)
    return summary


def report(abl: AblationConfig, name: str = "ablation") -> dict:
    """Write <report>/<name>.json, .md, .png and <name>_data.png (with data-efficiency runs); print the tables."""
    summary = summarise(abl)
    out = Path(abl.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps({**summary, "versions": versions()}, indent=2, allow_nan=False)
    )  # DVC metrics: no NaN
    text = markdown(summary)
    (out / f"{name}.md").write_text(f"{text}\n{versions_line()}\n")
    plot(summary, out, name)
    print(text)
    return summary

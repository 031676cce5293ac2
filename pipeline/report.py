"""The ablation's report: mean ± std over seeds, per-seed values, paired differences, gap closed, plots.

Paired differences compare each variant with the baseline at the SAME seed (same initial weights and batch
order), which removes most of the seed-to-seed spread; the gap closed is the share of the baseline -> teacher
accuracy gap a variant's mean accuracy covers.

Bits per character is the likelihood to compare across tokenizers (perplexity counts each model's own tokens).
A missing value (null, or NaN in an older file: the cache metrics of a student with another tokenizer than the
teacher's; a metric an older run did not record) is left out of means and differences and shown as "—".
"""

import json
import statistics
from pathlib import Path

from pipeline.ablation import METRICS, AblationConfig, AblationError, run_dir
from pipeline.versions import versions, versions_line

STATS = METRICS
PAIRED = ("accuracy", "kl_teacher", "perplexity", "bits_per_char")
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


def paired(runs: list[dict], ref: list[dict], metric: str) -> dict:
    """Mean and std over seeds of run - reference at the same seed (seeds where either is missing left out)."""
    pairs = [(r.get(metric), b.get(metric)) for r, b in zip(runs, ref)]
    return mean_std(a - b for a, b in pairs if a is not None and b is not None)


def _read(path: Path) -> dict:
    """A run's metrics; NaN (written by json.dumps for a missing value) is read as None, like null."""
    if not path.is_file():
        raise AblationError(f"missing ablation result {path}: run its stage first (dvc repro params/ablation/dvc.yaml)")
    return json.loads(path.read_text(), parse_constant=lambda _: None)  # NaN, Infinity, -Infinity


def summarise(abl: AblationConfig) -> dict:
    """Every run's metrics gathered into per-variant statistics, paired differences and gap closed."""
    tasks = {}
    for task in abl.tasks:
        teacher = _read(Path(abl.out) / task / "teacher.json")
        runs = {v: [_read(run_dir(abl, task, v, s) / "metrics.json") for s in abl.seeds] for v in abl.variants}
        base = runs[abl.baseline]
        base_acc = statistics.fmean(r["accuracy"] for r in base)
        gap = teacher["accuracy"] - base_acc
        variants = {}
        for v, rs in runs.items():
            stats = {m: per_seed(rs, m) for m in STATS}
            diffs = {m: paired(rs, base, m) for m in PAIRED}
            acc = stats["accuracy"]["mean"]
            variants[v] = {
                **stats,
                "paired_vs_baseline": diffs,
                "gap_closed": (acc - base_acc) / gap if gap > 0 else None,
            }
        tasks[task] = {"teacher": teacher, "variants": variants}
    de = abl.data_efficiency
    curves = {}
    for v in de.variants:
        points = []
        for f in [*de.fractions, 1.0]:
            rs = [_read(run_dir(abl, de.task, v, s, f) / "metrics.json") for s in abl.seeds]
            points.append({"fraction": f, **per_seed(rs, "accuracy")})
        curves[v] = points
    sw, ex = abl.sweep, abl.exact_teacher
    xt = abl.cross_tokenizer
    cross = {}
    if xt.variants:
        runs = {v: [_read(run_dir(abl, xt.task, v, s) / "metrics.json") for s in abl.seeds] for v in xt.variants}
        for v, rs in runs.items():
            cross[v] = {
                "overrides": xt.variants[v],
                **{m: per_seed(rs, m) for m in STATS},
                "paired_vs_baseline": {m: paired(rs, runs[xt.baseline], m) for m in PAIRED},
            }
    return {
        "seeds": abl.seeds,
        "baseline": abl.baseline,
        "variants": abl.variants,
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
        "cross_tokenizer": {"task": xt.task, "baseline": xt.baseline, "variants": cross},
    }


def settings(abl: AblationConfig, task: str, reference: str, variants: dict) -> dict:
    """Per setting (a sweep's, the exact teacher's): its overrides, statistics and paired difference to the
    reference variant."""
    ref = [_read(run_dir(abl, task, reference, s) / "metrics.json") for s in abl.seeds] if variants else []
    out = {}
    for v, over in variants.items():
        rs = [_read(run_dir(abl, task, v, s) / "metrics.json") for s in abl.seeds]
        swept = ("accuracy", "bits_per_char", "kl_teacher", "train_seconds")
        out[v] = {
            "overrides": over,
            **{m: per_seed(rs, m) for m in swept},
            "paired_vs_reference": {m: paired(rs, ref, m) for m in swept},
        }
    return out


def _num(x, fmt: str) -> str:
    return DASH if x is None else format(x, fmt)


def _pm(stat: dict, fmt: str, scale: float = 1.0, suffix: str = "", sign: str = "") -> str:
    """ "mean ± std" (both x scale, then suffix), "—" when no seed has a value; sign="+" signs the mean (a Δ)."""
    if stat["mean"] is None:
        return DASH
    return f"{format(scale * stat['mean'], sign + fmt)} ± {format(scale * stat['std'], fmt)}{suffix}"


def markdown(summary: dict) -> str:
    """The report as Markdown tables: per task, mean ± std over seeds, per-seed accuracy, paired difference."""
    lines = [
        f'Seeds {summary["seeds"]}; ± is the sample std over seeds; "paired Δ" is the per-seed difference '
        f"to `{summary['baseline']}` (same init and batch order), mean ± std.",
        "",
    ]
    for task, t in summary["tasks"].items():
        te = t["teacher"]
        bpc = "" if te.get("bits_per_char") is None else f", {te['bits_per_char']:.4f} bits per character"
        lines += [
            f"### {task}: teacher accuracy {te['accuracy']:.1%}, perplexity {te['perplexity']:.3f}{bpc}, "
            f"entropy {te['entropy']:.3f} nats per answer token",
            "",
            "| variant | accuracy | per seed | paired Δ accuracy | gap closed | perplexity | bits/char "
            "| paired Δ bits/char | KL(teacher‖student) | paired Δ KL | top-1 agreement | train s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v, s in t["variants"].items():
            p = s["paired_vs_baseline"]
            per_seed = " / ".join(_num(x, ".1%") for x in s["accuracy"]["per_seed"])
            lines.append(
                f"| {v} | {_pm(s['accuracy'], '.1f', 100, '%')} | {per_seed} | "
                f"{_pm(p['accuracy'], '.1f', 100, sign='+')} | {_num(s['gap_closed'], '.0%')} | "
                f"{_pm(s['perplexity'], '.3f')} | {_pm(s['bits_per_char'], '.4f')} | "
                f"{_pm(p['bits_per_char'], '.4f', sign='+')} | {_pm(s['kl_teacher'], '.4f')} | "
                f"{_pm(p['kl_teacher'], '.4f', sign='+')} | {_pm(s['top1_agreement'], '.1f', 100, '%')} | "
                f"{_pm(s['train_seconds'], '.0f')} |"
            )
        lines.append("")
    de = summary["data_efficiency"]
    lines += [
        f"### data efficiency ({de['task']}): accuracy vs. share of the training data, equal steps",
        "",
        "| variant | "
        + " | ".join(f"{p['fraction']:.0%} of the data" for p in next(iter(de["curves"].values())))
        + " |",
        "|---|" + "---:|" * len(next(iter(de["curves"].values()))),
    ]
    for v, pts in de["curves"].items():
        lines.append(f"| {v} | " + " | ".join(_pm(p, ".1f", 100, "%") for p in pts) + " |")
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
        same = summary["tasks"][xt["task"]]["variants"][summary["baseline"]]
        lines += [
            "",
            f"### cross-tokenizer students ({xt['task']}): their own tokenizer, the teacher's cache, paired "
            f"with `{xt['baseline']}`",
            "",
            f"The same-tokenizer `{summary['baseline']}` student: accuracy {_pm(same['accuracy'], '.1f', 100, '%')}"
            f", bits/char {_pm(same['bits_per_char'], '.4f')} (bits per character compare students across "
            "tokenizers; perplexity is per token of each student's own tokenizer).",
            "",
            "| variant | overrides | accuracy | per seed | paired Δ accuracy | bits/char | paired Δ bits/char "
            "| perplexity (own tokens) | train s |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for v, s in xt["variants"].items():
            p = s["paired_vs_baseline"]
            over = ", ".join(f"{k}={x}" for k, x in s["overrides"].items()) or "(the task's weights)"
            lines.append(
                f"| {v} | {over} | {_pm(s['accuracy'], '.1f', 100, '%')} | "
                + " / ".join(_num(x, ".1%") for x in s["accuracy"]["per_seed"])
                + f" | {_pm(p['accuracy'], '.1f', 100, sign='+')} | {_pm(s['bits_per_char'], '.4f')} | "
                f"{_pm(p['bits_per_char'], '.4f', sign='+')} | {_pm(s['perplexity'], '.3f')} | "
                f"{_pm(s['train_seconds'], '.0f')} |"
            )
    return "\n".join(lines) + "\n"


def _settings_table(sw: dict, title: str) -> list[str]:
    """Markdown lines of a settings table (the sweep, the exact teacher): each setting against its reference."""
    if not sw.get("settings"):
        return []
    lines = [
        "",
        f"### {title} ({sw['task']}): each setting against `{sw['reference']}`, paired by seed",
        "",
        "| setting | overrides | accuracy | per seed | paired Δ accuracy | bits/char | paired Δ bits/char "
        "| KL | paired Δ KL | train s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, s in sw["settings"].items():
        p = s["paired_vs_reference"]
        over = ", ".join(f"{k}={x}" for k, x in s["overrides"].items())
        lines.append(
            f"| {v} | {over} | {_pm(s['accuracy'], '.1f', 100, '%')} | "
            + " / ".join(_num(x, ".1%") for x in s["accuracy"]["per_seed"])
            + f" | {_pm(p['accuracy'], '.1f', 100, sign='+')} | {_pm(s['bits_per_char'], '.4f')} | "
            f"{_pm(p['bits_per_char'], '.4f', sign='+')} | {_pm(s['kl_teacher'], '.4f')} | "
            f"{_pm(p['kl_teacher'], '.4f', sign='+')} | {_pm(s['train_seconds'], '.0f')} |"
        )
    return lines


def _nan(x) -> float:
    return float("nan") if x is None else x


def plot(summary: dict, out: Path) -> None:
    """ablation.png (accuracy and KL per variant and task, error bars = std over seeds) and ablation_data.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for j, (task, t) in enumerate(tasks.items()):
        names = list(t["variants"])
        for i, (metric, label) in enumerate([("accuracy", "task accuracy"), ("kl_teacher", "KL(teacher‖student)")]):
            ax = axes[i][j]
            means = [_nan(t["variants"][v][metric]["mean"]) for v in names]  # a missing bar is left out
            stds = [_nan(t["variants"][v][metric]["std"]) for v in names]
            ax.bar(names, means, yerr=stds, capsize=4, color="#8fb3d9")
            for k, v in enumerate(names):  # the seeds themselves, so the spread is visible
                ys = [y for y in t["variants"][v][metric]["per_seed"] if y is not None]
                if ys:  # no point at all: matplotlib cannot place an all-NaN scatter on the named axis
                    ax.scatter([k] * len(ys), ys, color="k", s=10, zorder=3)
            if metric == "accuracy":
                ax.axhline(t["teacher"]["accuracy"], color="tab:red", ls="--", label="teacher")
                ax.legend(loc="lower right")
            ax.set_title(f"{task}: {label}")
            ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)

    de = summary["data_efficiency"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, pts in de["curves"].items():
        ax.errorbar(
            [p["fraction"] for p in pts],
            [p["mean"] for p in pts],
            yerr=[p["std"] for p in pts],
            marker="o",
            capsize=4,
            label=v,
        )
    ax.set_xscale("log")
    ax.set_xlabel("share of the training data (equal steps)")
    ax.set_ylabel("task accuracy")
    ax.set_title(f"data efficiency ({de['task']}, {len(summary['seeds'])} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ablation_data.png", dpi=110)
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
        "vs_reference": {"task": ex.task, "reference": ex.reference, "settings": against_ref},
        "vs_baseline": {"task": ex.task, "reference": abl.baseline, "settings": against_base},
    }
    codecs = ", ".join(f"{k} = {v}" for k, v in ex.codecs.items())
    text = (
        "\n".join(
            [
                f"Seeds {abl.seeds}; ± is the sample std over seeds; paired Δ is per seed (same init and batch "
                f"order). Hidden codecs of the extra caches: {codecs or 'none'}.",
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


def report(abl: AblationConfig) -> dict:
    """Write <report>/ablation.json, ablation.md, ablation.png and ablation_data.png; print the tables."""
    summary = summarise(abl)
    out = Path(abl.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(
        json.dumps({**summary, "versions": versions()}, indent=2, allow_nan=False)
    )  # DVC metrics: no NaN
    text = markdown(summary)
    (out / "ablation.md").write_text(f"{text}\n{versions_line()}\n")
    plot(summary, out)
    print(text)
    return summary

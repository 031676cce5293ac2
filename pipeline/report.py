"""The ablation's report: mean ± std over seeds, per-seed values, paired differences, gap closed, plots.

Paired differences compare each variant with the baseline at the SAME seed (same initial weights and batch
order), which removes most of the seed-to-seed spread; the gap closed is the share of the baseline -> teacher
accuracy gap a variant's mean accuracy covers.
"""
import json
import statistics
from pathlib import Path

from pipeline.ablation import METRICS, AblationConfig, AblationError, run_dir


def mean_std(xs: list[float]) -> dict:
    """{"mean", "std"}: the sample standard deviation (0 for a single value)."""
    xs = list(xs)
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def per_seed(runs: list[dict], metric: str) -> dict:
    """{"per_seed", "mean", "std"} of one metric over runs (one per seed)."""
    xs = [r[metric] for r in runs]
    return {"per_seed": xs, **mean_std(xs)}


def paired(runs: list[dict], ref: list[dict], metric: str) -> dict:
    """Mean and std over seeds of run - reference at the same seed."""
    return mean_std(r[metric] - b[metric] for r, b in zip(runs, ref))


def _read(path: Path) -> dict:
    if not path.is_file():
        raise AblationError(f"missing ablation result {path}: run its stage first (dvc repro "
                            "params/ablation/dvc.yaml)")
    return json.loads(path.read_text())


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
            stats = {m: per_seed(rs, m) for m in METRICS}
            diffs = {m: paired(rs, base, m) for m in ("accuracy", "kl_teacher", "perplexity")}
            acc = stats["accuracy"]["mean"]
            variants[v] = {**stats, "paired_vs_baseline": diffs,
                           "gap_closed": (acc - base_acc) / gap if gap > 0 else float("nan")}
        tasks[task] = {"teacher": teacher, "variants": variants}
    de = abl.data_efficiency
    curves = {}
    for v in de.variants:
        points = []
        for f in [*de.fractions, 1.0]:
            rs = [_read(run_dir(abl, de.task, v, s, f) / "metrics.json") for s in abl.seeds]
            points.append({"fraction": f, **per_seed(rs, "accuracy")})
        curves[v] = points
    sw = abl.sweep
    ref = [_read(run_dir(abl, sw.task, sw.reference, s) / "metrics.json") for s in abl.seeds] if sw.variants else []
    sweep = {}
    for v, over in sw.variants.items():
        rs = [_read(run_dir(abl, sw.task, v, s) / "metrics.json") for s in abl.seeds]
        sweep[v] = {"overrides": over, **{m: per_seed(rs, m) for m in ("accuracy", "kl_teacher")},
                    "paired_vs_reference": {m: paired(rs, ref, m) for m in ("accuracy", "kl_teacher")}}
    return {"seeds": abl.seeds, "baseline": abl.baseline, "variants": abl.variants, "tasks": tasks,
            "data_efficiency": {"task": de.task, "curves": curves},
            "sweep": {"task": sw.task, "reference": sw.reference, "settings": sweep}}


def _pm(stat: dict, fmt: str) -> str:
    return f"{format(stat['mean'], fmt)} ± {format(stat['std'], fmt)}"


def markdown(summary: dict) -> str:
    """The report as Markdown tables: per task, mean ± std over seeds, per-seed accuracy, paired difference."""
    lines = [f"Seeds {summary['seeds']}; ± is the sample std over seeds; \"paired Δ\" is the per-seed difference "
             f"to `{summary['baseline']}` (same init and batch order), mean ± std.", ""]
    for task, t in summary["tasks"].items():
        te = t["teacher"]
        lines += [f"### {task}: teacher accuracy {te['accuracy']:.1%}, perplexity {te['perplexity']:.3f}, "
                  f"entropy {te['entropy']:.3f} nats per answer token", "",
                  "| variant | accuracy | per seed | paired Δ accuracy | gap closed | perplexity "
                  "| KL(teacher‖student) | paired Δ KL | top-1 agreement | train s |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v, s in t["variants"].items():
            p = s["paired_vs_baseline"]
            per_seed = " / ".join(f"{x:.1%}" for x in s["accuracy"]["per_seed"])
            lines.append(
                f"| {v} | {_pm({k: 100 * x for k, x in s['accuracy'].items() if k != 'per_seed'}, '.1f')}% | "
                f"{per_seed} | {100 * p['accuracy']['mean']:+.1f} ± {100 * p['accuracy']['std']:.1f} | "
                f"{s['gap_closed']:.0%} | {_pm(s['perplexity'], '.3f')} | {_pm(s['kl_teacher'], '.4f')} | "
                f"{p['kl_teacher']['mean']:+.4f} ± {p['kl_teacher']['std']:.4f} | "
                f"{_pm({k: 100 * x for k, x in s['top1_agreement'].items() if k != 'per_seed'}, '.1f')}% | "
                f"{_pm(s['train_seconds'], '.0f')} |")
        lines.append("")
    de = summary["data_efficiency"]
    lines += [f"### data efficiency ({de['task']}): accuracy vs. share of the training data, equal steps", "",
              "| variant | " + " | ".join(f"{p['fraction']:.0%} of the data" for p in
                                         next(iter(de["curves"].values()))) + " |",
              "|---|" + "---:|" * len(next(iter(de["curves"].values())))]
    for v, pts in de["curves"].items():
        lines.append(f"| {v} | " + " | ".join(f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}%" for p in pts) + " |")
    sw = summary["sweep"]
    if sw["settings"]:
        lines += ["", f"### sweep ({sw['task']}): each setting against `{sw['reference']}`, paired by seed", "",
                  "| setting | overrides | accuracy | per seed | paired Δ accuracy | KL | paired Δ KL |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for v, s in sw["settings"].items():
            p = s["paired_vs_reference"]
            over = ", ".join(f"{k}={x}" for k, x in s["overrides"].items())
            lines.append(f"| {v} | {over} | {100 * s['accuracy']['mean']:.1f} ± {100 * s['accuracy']['std']:.1f}% | "
                         + " / ".join(f"{x:.1%}" for x in s["accuracy"]["per_seed"])
                         + f" | {100 * p['accuracy']['mean']:+.1f} ± {100 * p['accuracy']['std']:.1f} | "
                         f"{s['kl_teacher']['mean']:.4f} ± {s['kl_teacher']['std']:.4f} | "
                         f"{p['kl_teacher']['mean']:+.4f} ± {p['kl_teacher']['std']:.4f} |")
    return "\n".join(lines) + "\n"


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
            means = [t["variants"][v][metric]["mean"] for v in names]
            stds = [t["variants"][v][metric]["std"] for v in names]
            ax.bar(names, means, yerr=stds, capsize=4, color="#8fb3d9")
            for k, v in enumerate(names):  # the seeds themselves, so the spread is visible
                ys = t["variants"][v][metric]["per_seed"]
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
        ax.errorbar([p["fraction"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                    marker="o", capsize=4, label=v)
    ax.set_xscale("log")
    ax.set_xlabel("share of the training data (equal steps)")
    ax.set_ylabel("task accuracy")
    ax.set_title(f"data efficiency ({de['task']}, {len(summary['seeds'])} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ablation_data.png", dpi=110)
    plt.close(fig)


def report(abl: AblationConfig) -> dict:
    """Write <report>/ablation.json, ablation.md, ablation.png and ablation_data.png; print the tables."""
    summary = summarise(abl)
    out = Path(abl.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    (out / "ablation.md").write_text(text)
    plot(summary, out)
    print(text)
    return summary


"""The evaluate stage's figure: the Stage 2 loss curves of the evaluated models (curves.png).

Apart from the metrics (evaluate.py) so that computing them never imports matplotlib: evaluate.run imports this
module only where it draws, and the Agg backend (files only, no display) is selected here, on that first import.
"""

import csv
import math
from pathlib import Path

import matplotlib
import yaml

from pipeline.distill.batches import TERM_NAMES

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402


def read_curves(path: Path) -> dict[str, list[float]]:
    """A Stage 2 loss-curve TSV as column -> values (empty cells become NaN)."""
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {k: [float(r[k]) if r[k] else math.nan for r in rows] for k in (rows[0] if rows else {})}


def made_by_stage2(path: str) -> bool:
    """Whether `path` is a Stage 2 output (its saved config's distill.out is this folder).

    Curve files are named after the output folder, and artifacts/base/student shares its name with
    artifacts/student: the untrained student must not be drawn with the distilled one's curves.
    """
    f = Path(path) / "config.yaml"
    if not f.exists():
        return False
    out = ((yaml.safe_load(f.read_text()) or {}).get("distill") or {}).get("out")
    return bool(out) and Path(out).resolve() == Path(path).resolve()


def training_curves(models: dict[str, str], plots: str) -> dict[str, dict]:
    """Model name -> its Stage 2 loss curves, for each model of `models` (name -> folder), in that order, that
    Stage 2 trained and whose curve file is in the `plots` folder."""
    curves = {}
    for name, path in models.items():
        f = Path(plots) / f"train_{Path(path).name}.tsv"  # as batches.curves_path names it
        if made_by_stage2(path) and f.exists():
            curves[name] = read_curves(f)
    return curves


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """One panel per loss component, one line per trained model (nothing to draw still gives a figure)."""
    panels = [k for k in ("loss", *TERM_NAMES) if any(k in c for c in curves.values())] or ["loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    color = {name: f"C{i}" for i, name in enumerate(curves)}  # one colour per model across all panels
    for ax, key in zip(axes[0], panels):
        for name, c in curves.items():
            if key in c:
                ax.plot(c["step"], c[key], label=name, color=color[name])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if curves:
        axes[0][0].legend(fontsize=8)
    else:
        axes[0][0].text(0.5, 0.5, "no training curves", ha="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

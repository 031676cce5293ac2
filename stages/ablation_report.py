"""The ablation's report: every run gathered into tables and plots (the last stage of params/ablation/dvc.yaml).

    python -m stages.ablation_report [--ablation params/ablation/params.yaml]
    python -m stages.ablation_report --ablation params/ablation/params.yaml \
        --ablation params/ablation/control/params.yaml --name control      # with an optional section
    python -m stages.ablation_report --ablation params/ablation/params.yaml \
        --ablation params/ablation/crosstok/params.yaml --only exact_teacher   # that section alone, from its runs
Writes <report>/<name>.{json,md,png} and <name>_data.png: mean ± std over seeds, per-seed values, paired
differences to the baseline variant with bootstrap intervals, the share of the baseline -> teacher gap each
variant closes (--only exact_teacher: <report>/ablation_exact.{json,md}).
"""

import typer

from stages._cli import clear_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    ablation: list[str] = typer.Option(
        ["params/ablation/params.yaml"],
        "--ablation",
        help="The ablation's params; repeat it to add an optional section's file (disjoint keys).",
    ),
    name: str = typer.Option("ablation", help="File name of the report (<report>/<name>.{json,md,png})."),
    only: str = typer.Option(
        None,
        help="exact_teacher: only that section (needs only its runs and the task's "
        "reference and baseline students), into ablation_exact.{json,md}.",
    ),
):
    """Gather every run into <name>.{json,md,png} and <name>_data.png under `report`."""
    with clear_errors():
        from pipeline.ablation import AblationError, load_ablation
        from pipeline.report import exact_teacher_report, report

        abl = load_ablation(*ablation)
        if only not in (None, "exact_teacher"):
            raise AblationError(f"--only {only!r}: the one section reported alone is exact_teacher")
        exact_teacher_report(abl) if only else report(abl, name)


if __name__ == "__main__":
    app()

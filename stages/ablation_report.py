"""The ablation's report: every run gathered into tables and plots (the last stage of params/ablation/dvc.yaml).

    python -m stages.ablation_report [--ablation params/ablation/params.yaml]
Writes <report>/ablation.{json,md,png} and ablation_data.png: mean ± std over seeds, per-seed values, paired
differences to the baseline variant, the share of the baseline -> teacher gap each variant closes.
"""
import typer

from stages._cli import clear_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(ablation: str = typer.Option("params/ablation/params.yaml", "--ablation", help="The ablation's params.")):
    """Gather every run into ablation.{json,md,png} and ablation_data.png under `report`."""
    with clear_errors():
        from pipeline.ablation import load_ablation
        from pipeline.report import report

        report(load_ablation(ablation))


if __name__ == "__main__":
    app()

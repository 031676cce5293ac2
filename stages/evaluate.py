"""Evaluate the teacher and the students: test perplexity, task accuracy, top-1 agreement and KL on the cache.

    python -m stages.evaluate [--set evaluate.eval_examples=0]
Writes <evaluate.out>/metrics.json (DVC metrics), metrics.md and curves.png.
"""

import typer

from pipeline.config.evaluate import EvalParams
from stages._cli import PARAMS, SET, clear_errors, config

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: str = PARAMS,
    overrides: list[str] = SET,
    out: str = typer.Option(None, help="Folder for metrics.json, metrics.md and curves.png (evaluate.out)."),
    eval_examples: int = typer.Option(None, help="Test examples for task accuracy, 0 = all (evaluate.eval_examples)."),
):
    """Compare teacher, base student, CE-only student and distilled student."""
    with clear_errors():
        cfg = config(EvalParams, params, overrides, {"evaluate.out": out, "evaluate.eval_examples": eval_examples})
        from pipeline.evaluation import evaluate  # imported late so --help answers without loading torch

        evaluate.run(cfg)


if __name__ == "__main__":
    app()

"""The ablation's stages (dvc repro params/ablation/dvc.yaml runs the core; params/ablation/<section>/dvc.yaml an
optional section, whose commands add its params file with a second --ablation).

    python -m stages.ablation teacher split              # evaluate a task's teacher once
    python -m stages.ablation student split kl_ot 0      # train + evaluate one student (task, variant, seed)
    python -m stages.ablation student split ce 1 --fraction 0.1   # on 10% of the data, same steps
The report is its own stage (python -m stages.ablation_report), so that editing it reruns no student.
"""

import typer

from stages._cli import clear_errors

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
ABLATION = typer.Option(
    ["params/ablation/params.yaml"],
    "--ablation",
    help="The ablation's params: seeds, tasks (-> their params files), variants, report. Repeat it to add an "
    "optional section's file (e.g. --ablation params/ablation/params.yaml --ablation "
    "params/ablation/control/params.yaml); the files set disjoint keys.",
)


def _load(paths: list[str]):
    from pipeline.ablation import load_ablation

    return load_ablation(*paths)


@app.command()
def teacher(task: str = typer.Argument(..., help="A key of `tasks`."), ablation: list[str] = ABLATION):
    """Evaluate the task's teacher (accuracy, perplexity, entropy of its soft targets)."""
    with clear_errors():
        abl = _load(ablation)
        from pipeline.ablation import run_teacher  # torch only after the params are known to be valid

        run_teacher(abl, task)


@app.command()
def student(
    task: str = typer.Argument(..., help="A key of `tasks`."),
    variant: str = typer.Argument(..., help="A key of `variants`."),
    seed: int = typer.Argument(..., help="Seed: initial weights, P and batch order."),
    fraction: float = typer.Option(1.0, help="Share of the training cache, at the steps of all of it."),
    ablation: list[str] = ABLATION,
):
    """Train one student with the variant's losses, then evaluate it (<out>/<task>/<variant>/s<seed>/)."""
    with clear_errors():
        abl = _load(ablation)
        from pipeline.ablation import run_student

        run_student(abl, task, variant, seed, fraction)


if __name__ == "__main__":
    app()

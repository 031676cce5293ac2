"""VRAM plan: the GPU memory Stage 1 and Stage 2 need for a params file, and whether they fit - no GPU needed.

python -m stages.plan --params params/qwen2.5-7b_to_1.5b.yaml [--gpu-gb 24] [--max-length 4096]
    [--out artifacts/qwen2.5-7b_to_1.5b/plan.json]
"""

import typer

from pipeline.config.params import Config
from stages._cli import PARAMS, SET, clear_errors, config

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: str = PARAMS,
    overrides: list[str] = SET,
    gpu_gb: float = typer.Option(24.0, help="GPU memory in GiB (an RTX 4090: 24)."),
    max_length: int = typer.Option(None, help="Sequence length to plan for (data.max_length)."),
    out: str = typer.Option(None, help="Write the plan as JSON here (a DVC metric); the table is always printed."),
):
    """Print the memory budget of both stages on one GPU, the verdict and the longest sequence that fits."""
    with clear_errors():
        cfg = config(Config, params, overrides, {"data.max_length": max_length})
        from pipeline.planning import plan  # imported late so --help answers at once

        plan.run(cfg, gpu_gb, out)


if __name__ == "__main__":
    app()

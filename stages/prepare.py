"""Embedded default: synthetic task data (JSONL), a locally trained tokenizer and tiny random Qwen2 models.

python -m stages.prepare [--set prepare.n_examples=2000]
"""

import typer

from pipeline.config.prepare import PrepareParams
from stages._cli import PARAMS, SET, clear_errors, config

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(params: str = PARAMS, overrides: list[str] = SET):
    """Write artifacts/data/task.jsonl and artifacts/base/{tokenizer,teacher,student}."""
    with clear_errors():
        cfg = config(PrepareParams, params, overrides, {})
        from pipeline.data import prepare

        prepare.run(cfg)


if __name__ == "__main__":
    app()

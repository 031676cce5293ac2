"""Fine-tune the teacher on the task (LoRA + merge, or full), save a plain checkpoint, report its accuracy.

python -m stages.finetune_teacher [--base Qwen/Qwen2.5-3B-Instruct --mode lora]
"""

import typer

from pipeline.config.finetune import FinetuneParams
from stages._cli import PARAMS, SET, clear_errors, config

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: str = PARAMS,
    overrides: list[str] = SET,
    base: str = typer.Option(None, help="Model to fine-tune: local folder or hub name (finetune.base)."),
    out: str = typer.Option(None, help="Where the fine-tuned checkpoint goes (finetune.out)."),
    mode: str = typer.Option(None, help="lora (then merged) or full (finetune.mode)."),
):
    """SFT the teacher on the training split; held-out accuracy goes to <out>/metrics.json."""
    with clear_errors():
        cfg = config(
            FinetuneParams, params, overrides, {"finetune.base": base, "finetune.out": out, "finetune.mode": mode}
        )
        from pipeline.teacher import finetune

        finetune.run(cfg)


if __name__ == "__main__":
    app()

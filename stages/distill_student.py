"""Stage 2: train the student alone against the teacher cache (CE + top-k KL + OT on hidden states and logits).

    python -m stages.distill_student [--student PATH --mode lora --load-in-bits 4] [--set distill.w_ot=0.5]
    # KL to the exact teacher, rebuilt from the cached hidden states with its lm_head alone
    python -m stages.distill_student --teacher-head Qwen/Qwen2.5-7B
    # the CE-only baseline: the same stage with every teacher term off and its own output folder
    python -m stages.distill_student --set distill.w_kl=0 --set distill.w_ot=0 --set distill.w_ot_logits=0 \\
        --out artifacts/student_ce
    # data-parallel, one process per GPU: global batch = distill.batch_size x GPUs x distill.grad_accum
    torchrun --nproc_per_node=8 -m stages.distill_student      # or: accelerate launch -m stages.distill_student
"""

import typer

from pipeline.config.distill import DistillParams
from stages._cli import PARAMS, SET, clear_errors, config

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: str = PARAMS,
    overrides: list[str] = SET,
    student: str = typer.Option(None, help="Student checkpoint: local folder or hub name (distill.student)."),
    cache: str = typer.Option(
        None,
        help="Folder (or fsspec URL, e.g. s3://bucket/prefix) with Stage 1's train.zarr / "
        "validation.zarr (distill.cache).",
    ),
    out: str = typer.Option(
        None,
        help="Where the student (or its adapter) + projection go (distill.out); the "
        "loss curves go to <distill.plots>/train_<name of out>.tsv.",
    ),
    mode: str = typer.Option(None, help="full or lora (distill.mode)."),
    load_in_bits: int = typer.Option(None, help="4 (NF4 QLoRA, needs --mode lora), 8 or 16 (distill.load_in_bits)."),
    max_steps: int = typer.Option(None, help="Stop after this many optimizer steps (distill.max_steps)."),
    teacher_head: str = typer.Option(
        None,
        help="Teacher checkpoint whose lm_head rebuilds the exact teacher from the "
        "cached hidden states: full-vocabulary KL (distill.teacher_head).",
    ),
    resume: bool = typer.Option(
        None, "--resume/--no-resume", help="Continue from the newest checkpoint in <out>/checkpoints (distill.resume)."
    ),
):
    """Distil the cached teacher into the student; the teacher model itself is never loaded. Data-parallel under
    torchrun or accelerate launch (global batch = distill.batch_size x processes x distill.grad_accum)."""
    with clear_errors():
        cfg = config(
            DistillParams,
            params,
            overrides,
            {
                "distill.student": student,
                "distill.cache": cache,
                "distill.out": out,
                "distill.mode": mode,
                "distill.load_in_bits": load_in_bits,
                "distill.max_steps": max_steps,
                "distill.resume": resume,
                "distill.teacher_head": teacher_head,
            },
        )
        from pipeline.distill import train as distill  # imported late so --help answers without loading torch

        distill.run(cfg)


if __name__ == "__main__":
    app()

"""Export the distilled student as a plain transformers checkpoint that any server loads, with a model card.

    python -m stages.export_student                      # artifacts/student -> artifacts/export (bf16)
    python -m stages.export_student --student artifacts/qwen2.5-7b_to_1.5b/student \\
        --out artifacts/qwen2.5-7b_to_1.5b/export --base Qwen/Qwen2.5-1.5B \\
        --metrics artifacts/qwen2.5-7b_to_1.5b/metrics/metrics.json
    vllm serve artifacts/export                          # then, e.g., serve it (vLLM is not a dependency)

A LoRA student is merged into its base (for NF4 + LoRA: into the original 16-bit checkpoint when it can be
loaded, else into the 4-bit weights dequantised; the output says which); full fine-tuning is exported as it is.
P and everything else used only for training is left out. Written: sharded safetensors + index, tokenizer,
generation_config.json, README.md (model card: base, teacher, data, cache, losses, OT, steps, metrics, versions).
Reads no params.yaml: the student folder's config.yaml, the cache's provenance and the evaluation say it all.
"""

import typer

from stages._cli import clear_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    student: str = typer.Option("artifacts/student", help="Stage 2's output folder (distill.out of the run)."),
    out: str = typer.Option("artifacts/export", help="Folder to write the export to (replaced when complete)."),
    dtype: str = typer.Option("bfloat16", help="Weights of the export: bfloat16, float16 or float32."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors file, e.g. 5GB or 500MB."),
    base: str = typer.Option(
        None,
        help="The 16-bit checkpoint to merge a LoRA adapter into (default: distill.student of the run); for a "
        "pre-quantised student such as unsloth/Qwen2.5-1.5B-bnb-4bit, its original (Qwen/Qwen2.5-1.5B).",
    ),
    quantized_base: str = typer.Option(
        "auto",
        help="For a student trained on 4/8-bit weights: 'original' merges into the 16-bit checkpoint, "
        "'dequantized' into the quantised weights it trained on, 'auto' the first when it can be loaded.",
    ),
    cache: str = typer.Option(
        None, help="The teacher cache the student trained on, for its provenance (default: distill.cache of the run)."
    ),
    metrics: str = typer.Option(
        "artifacts/metrics/metrics.json", help="The evaluation's metrics.json for the model card ('' = none)."
    ),
    metrics_entry: str = typer.Option(
        "student_distilled", help="This student's name in metrics.json (its key in evaluate.models)."
    ),
    curves: str = typer.Option(
        None, help="Stage 2's loss curve TSV, for the step count (default: <distill.plots>/train_<name>.tsv)."
    ),
):
    """Merge the trained student into one plain transformers checkpoint (sharded safetensors, tokenizer, generation
    config, model card README.md), check its logits against the student, print which base was used. Then serve it,
    e.g. `vllm serve artifacts/export` (vLLM is not a dependency of otkd)."""
    with clear_errors():
        from pipeline.export import export  # imported late so --help answers without loading torch

        export.run(
            export.ExportOptions(
                student=student,
                out=out,
                dtype=dtype,
                max_shard_size=max_shard_size,
                base=base,
                quantized_base=quantized_base,
                cache=cache,
                metrics=metrics,
                metrics_entry=metrics_entry,
                curves=curves,
            )
        )


if __name__ == "__main__":
    app()

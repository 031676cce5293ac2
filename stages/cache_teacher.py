"""Stage 1: run the teacher alone and write its top-k log-probs, tail mass and hidden states to Zarr.

python -m stages.cache_teacher [--teacher PATH] [--k 64] [--set cache.batch_tokens=8192]
# data-parallel, one process per GPU (each writes whole shards of its own; the store is the same as one
# process's, and a killed job resumes at any number of GPUs):
torchrun --nproc_per_node=8 -m stages.cache_teacher --params params.yaml
"""

import typer

from pipeline.config.cache import CacheParams
from stages._cli import PARAMS, SET, clear_errors, config

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: str = PARAMS,
    overrides: list[str] = SET,
    teacher: str = typer.Option(None, help="Teacher checkpoint: local folder or hub name (cache.teacher)."),
    out: str = typer.Option(
        None, help="Output folder for the split stores, or an fsspec URL such as s3://bucket/prefix (cache.out)."
    ),
    k: int = typer.Option(None, help="Top-k log-probs stored per token (cache.k)."),
    hidden_codec: str = typer.Option(
        None,
        help="Hidden-state storage: bf16, fp16, int8, pca:<r>, svd:<r>, fisher:<r> "
        'or none (cache.hidden_codec; docs/design.md "Hidden-state codecs").',
    ),
    replace_mismatched: bool = typer.Option(
        False,
        help="Delete an existing store made from another teacher/tokenizer/data/params instead of "
        "refusing it (dvc.yaml sets this; a store from the same inputs is always resumed).",
    ),
):
    """Cache the teacher's targets for the configured splits; resumes an interrupted run. Under torchrun
    (torchrun --nproc_per_node=G -m stages.cache_teacher ...) each process writes its own shards of the same store."""
    with clear_errors():
        cfg = config(
            CacheParams,
            params,
            overrides,
            {"cache.teacher": teacher, "cache.out": out, "cache.k": k, "cache.hidden_codec": hidden_codec},
        )
        from pipeline.teacher import (
            cache_teacher as teacher_cache,
        )  # imported late so --help answers without loading torch

        teacher_cache.run(cfg, replace_mismatched)


if __name__ == "__main__":
    app()

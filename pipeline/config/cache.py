"""The `cache` section: Stage 1, the teacher's top-k log-probs, tail mass and hidden states written to Zarr."""

import re
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.base import Bits, Dtype, PathStr, at_least, check_fields, require
from pipeline.config.data import DataConfig

HIDDEN_CODEC = re.compile(r"bf16|fp16|int8|none|(pca|svd|fisher):[1-9][0-9]*")
"""The values of cache.hidden_codec (pipeline/teacher/codecs.py)."""


@dataclass(slots=True)
class CacheConfig:
    """Stage 1: run the teacher once and store its top-k distribution (and hidden state) per supervised token."""

    teacher: PathStr = "artifacts/teacher"
    """Teacher checkpoint: a local folder or a hub name (e.g. Qwen/Qwen2.5-7B)."""
    out: PathStr = "artifacts/cache"
    """Folder receiving one Zarr v3 store per split (`train.zarr`, `validation.zarr`), or an fsspec URL
    (s3://bucket/prefix, gs://..., file://...; credentials from the environment): docs/design.md "Caches on shared
    and object storage"."""
    splits: list[Literal["train", "validation", "test"]] = field(default_factory=lambda: ["train", "validation"])
    """Which data splits to cache."""
    k: int = 16
    """Top-k log-probs stored per token (64 is a good value for real 152k vocabularies)."""
    logprob_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Storage of top-k log-probs: "bf16" (uint16 bits, 33 B/token at k=64), "fp16" or "fp32"."""
    hidden_codec: str = "bf16"
    """How the teacher's final hidden state (the lm_head input) is stored: "bf16" (2 B per value), "fp16", "int8"
    (per-row absmax scale: ~half of bf16), a low-rank code of r coefficients per row with a basis fitted here and
    stored in the cache: "pca:<r>" (principal directions of h), "svd:<r>" (top right singular vectors of lm_head),
    "fisher:<r>" (the directions that matter most for the teacher's distribution: PCA in the metric of the mean
    Fisher information of softmax(W h), the second-order KL) - or "none" (no hidden states: no OT on hidden states,
    no exact teacher in Stage 2). pipeline/teacher/codecs.py and docs/design.md "Hidden-state codecs" say what each
    loses."""
    hidden_calibration_rows: int = 16384
    """Rows of the train split (spread over it) on which a pca/fisher basis is fitted, in a teacher pass of their
    own."""
    dtype: Dtype = "auto"
    """Teacher compute dtype (see `Dtype`)."""
    load_in_bits: Bits = 16
    """Load the teacher quantised with bitsandbytes (see `Bits`)."""
    device_map: Literal["", "auto"] = ""
    """"" = the whole teacher on this process's device (cuda:LOCAL_RANK under torchrun); "auto" = its layers spread
    over every GPU the process sees, for a teacher that does not fit one (accelerate's device map; run one process
    per group of GPUs, e.g. torchrun --nproc_per_node=1 on a 2-GPU node, or CUDA_VISIBLE_DEVICES pairs)."""
    batch_tokens: int = 8192
    """Padded tokens per teacher forward (sequences are batched by length)."""
    chunk_rows: int = 1024
    """Rows per lm_head + log-softmax chunk: bounds the [rows x vocab] fp32 logits alive at once."""
    shard_rows: int = 65536
    """Rows per Zarr shard: the unit of writing and of crash-safe resume."""

    def __post_init__(self):
        check_fields(self)
        require(
            bool(self.splits) and len(set(self.splits)) == len(self.splits),
            "splits",
            "a non-empty list without repeats",
            self.splits,
        )
        at_least(self, 1, "k", "batch_tokens", "chunk_rows", "shard_rows", "hidden_calibration_rows")
        require(
            HIDDEN_CODEC.fullmatch(self.hidden_codec) is not None,
            "hidden_codec",
            "bf16, fp16, int8, pca:<r>, svd:<r>, fisher:<r> (r >= 1) or none",
            self.hidden_codec,
        )


@dataclass(slots=True)
class CacheParams:
    """What `python -m stages.cache_teacher` (Stage 1) reads of params.yaml."""

    seed: int = 0
    """Seed of the splits (and the calibration rows of a low-rank hidden codec)."""
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self):
        check_fields(self)

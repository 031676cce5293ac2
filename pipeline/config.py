"""Typed configuration: one dataclass per stage, loaded from params.yaml, overridable per field.

`params.yaml` is the single source of truth that DVC tracks; each stage's CLI may override single values
(`--set cache.k=32` or a named option), and the resolved config is saved next to the stage's output so an
artifact always says how it was made.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


@dataclass
class ModelShape:
    """Size of a tiny Qwen2 model built from scratch for the embedded default."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size must divide by it)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen2)."""
    intermediate_size: int = 512
    """Width of the MLP."""


@dataclass
class PrepareConfig:
    """The embedded default: a synthetic task, a locally trained tokenizer and tiny random-init models."""

    out_data: str = "artifacts/data/task.jsonl"
    """Where the synthetic instruction dataset is written (JSONL, the user's own data format)."""
    out_models: str = "artifacts/base"
    """Folder receiving `tokenizer/`, `teacher/` and `student/` (Hugging Face format, random weights)."""
    n_examples: int = 4000
    """Number of synthetic examples (before the train/validation/test split)."""
    tokenizer_vocab: int = 384
    """Target size of the byte-level BPE vocabulary trained on the synthetic corpus."""
    vocab_multiple: int = 64
    """Model vocab = tokenizer size rounded up to this multiple: padded logits, like Qwen2.5's."""
    teacher: ModelShape = field(default_factory=lambda: ModelShape(128, 4, 4, 2, 512))
    """Shape of the tiny teacher."""
    student: ModelShape = field(default_factory=lambda: ModelShape(64, 2, 2, 1, 256))
    """Shape of the tiny student (clearly smaller than the teacher)."""


@dataclass
class DataConfig:
    """Instruction data and how it becomes supervised token sequences."""

    path: str = "artifacts/data/task.jsonl"
    """JSONL with {"instruction", "input", "output"} per line, or a local .json/.parquet Alpaca-style file."""
    template: str = "alpaca"
    """Prompt format: "alpaca" (the seeds' template + EOS) or "chat" (the tokenizer's chat template)."""
    max_length: int = 128
    """Longest tokenised example; longer ones are truncated (counted and reported)."""
    val_fraction: float = 0.05
    """Share of examples in the validation split (chosen by a hash of the sample id, so order-independent)."""
    test_fraction: float = 0.1
    """Share of examples in the test split (held out from every training stage)."""
    metric: str = "exact"
    """How a generated answer is judged: "exact" (equals the output) or "embedded_task" (the synthetic task's rule)."""


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of the teacher on the task (the seeds' step 1), before it is cached."""

    base: str = "artifacts/base/teacher"
    """Model to fine-tune: a local folder or a hub name."""
    out: str = "artifacts/teacher"
    """Where the fine-tuned (and, for LoRA, merged) teacher is saved as a plain checkpoint."""
    mode: str = "full"
    """"lora" (LoRA SFT then merge_and_unload, as in the seeds) or "full" (for the from-scratch tiny teacher)."""
    epochs: float = 6.0
    """Passes over the training split."""
    lr: float = 2e-3
    """Peak learning rate (cosine schedule with warmup)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    warmup_ratio: float = 0.05
    """Fraction of steps spent warming the learning rate up."""
    lora_r: int = 16
    """LoRA rank (mode=lora)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (mode=lora)."""
    lora_dropout: float = 0.0
    """LoRA dropout (mode=lora)."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Modules that get LoRA adapters: all attention and MLP projections, as in the seeds."""
    metrics: str = "artifacts/metrics/teacher.json"
    """Where the teacher's held-out accuracy is written (a DVC metric; outside `out`, DVC outputs can't nest)."""
    eval_examples: int = 200
    """Test examples used for the teacher's task accuracy after training (0 = all)."""


@dataclass
class CacheConfig:
    """Stage 1: run the teacher once and store its top-k distribution (and hidden state) per supervised token."""

    teacher: str = "artifacts/teacher"
    """Teacher checkpoint: a local folder or a hub name (e.g. Qwen/Qwen2.5-7B)."""
    out: str = "artifacts/cache"
    """Folder receiving one Zarr v3 store per split (`train.zarr`, `validation.zarr`)."""
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    """Which data splits to cache."""
    k: int = 16
    """Top-k log-probs stored per token (64 is a good value for real 152k vocabularies)."""
    logprob_dtype: str = "bf16"
    """Storage of top-k log-probs: "bf16" (uint16 bits, 33 B/token at k=64), "fp16" or "fp32"."""
    hidden_dtype: str = "bf16"
    """Storage of the teacher's final hidden state: "bf16", "fp16" or "none" (skip; hidden states dominate disk)."""
    dtype: str = "auto"
    """Teacher compute dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16" or "fp32"."""
    load_in_bits: int = 16
    """Load the teacher quantised with bitsandbytes: 4, 8, or 16 (= no quantisation)."""
    batch_tokens: int = 4096
    """Padded tokens per teacher forward (sequences are batched by length)."""
    chunk_rows: int = 1024
    """Rows per lm_head + log-softmax chunk: bounds the [rows x vocab] fp32 logits alive at once."""
    shard_rows: int = 65536
    """Rows per Zarr shard: the unit of writing and of crash-safe resume."""


@dataclass
class Config:
    """Everything params.yaml holds."""

    seed: int = 0
    """Seed for data generation, splits and training."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'params'}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown parameter {where + '.' if where else ''}{unknown[0]} "
                         f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        t = hints[name]
        kwargs[name] = _build(t, value, f"{where}.{name}".strip(".")) if dataclasses.is_dataclass(t) else value
    return cls(**kwargs)


def _coerce(text: str, current: Any):
    """Parse an override string with YAML (so 32, 1e-3, true, [a, b] work), checked against the field's type."""
    if isinstance(current, str):  # paths and names stay verbatim ("007" is not 7)
        return text
    value = yaml.safe_load(text)
    if isinstance(current, bool) != isinstance(value, bool) or (
            isinstance(current, (int, float)) and not isinstance(value, (int, float))):
        raise ValueError(f"expected a value like {current!r}, got {text!r}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    return value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings (the CLI's --set) to a config, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        *parents, leaf = key.strip().split(".")
        obj = cfg
        for p in parents:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ValueError(f"unknown parameter {key}")
            obj = getattr(obj, p)
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"unknown parameter {key}")
        try:
            setattr(obj, leaf, _coerce(text, getattr(obj, leaf)))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return cfg


def load_config(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    """Read params.yaml (missing sections take their defaults) and apply CLI overrides."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(_build(Config, values, ""), list(overrides))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (or one section of it) as YAML next to a stage's output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def config_hash(obj: Any) -> str:
    """Short stable hash of a dataclass or JSON-able value, for provenance records."""
    import hashlib
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

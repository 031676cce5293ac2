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
    n_digits: int = 6
    """Digits per task instruction (the answer is their sum); fewer is easier."""
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
    limit: int = 0
    """Use only the first `limit` records of the file (0 = all): 3000 takes the seeds' alpaca-cleaned slices
    train[:2000] + train[2000:3000]; the splits inside them are still chosen by sample id."""


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
class DistillConfig:
    """Stage 2: train the student alone against the streamed teacher cache (CE + KL + OT, weights below)."""

    student: str = "artifacts/base/student"
    """Student checkpoint: a local folder or a hub name (e.g. unsloth/Qwen2.5-1.5B-bnb-4bit's base). Must share
    the teacher's tokenizer (checked against the cache by tokenizer hash)."""
    cache: str = "artifacts/cache"
    """Folder holding Stage 1's `train.zarr` (and `validation.zarr`, used for the periodic eval if eval_steps > 0)."""
    out: str = "artifacts/student"
    """Where the trained student is saved: full weights (mode=full) or the LoRA adapter (mode=lora), plus
    `projection.pt` (the learned teacher->student projection P, when w_ot > 0) and `config.yaml`."""
    plots: str = "artifacts/plots"
    """Folder receiving the loss curves `train_<name of out>.tsv` (one row per logging step; DVC plots)."""
    mode: str = "full"
    """"lora" (LoRA adapters on a frozen, optionally 4-bit base: the real-model setting) or "full" (every weight
    trains: the random-init tiny student of the embedded default learns little through LoRA)."""
    load_in_bits: int = 16
    """Load the student quantised with bitsandbytes: 4 (NF4, QLoRA; needs mode=lora), 8, or 16 (no quantisation)."""
    dtype: str = "auto"
    """Student compute dtype (also the 4-bit compute dtype): "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16"
    or "fp32"."""
    lora_r: int = 16
    """LoRA rank (mode=lora)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (mode=lora)."""
    lora_dropout: float = 0.05
    """LoRA dropout (mode=lora)."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Modules that get LoRA adapters: all attention and MLP projections, as in the seeds."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time); for real models on one GPU."""
    optim: str = "adamw_torch"
    """Optimizer (a transformers `optim` name): "adamw_torch" (two moments in the parameter's dtype: 8 B per fp32
    LoRA parameter), "adamw_8bit" (bitsandbytes 8-bit moments, ~2 B; the seeds' AdamW8bit) or "paged_adamw_8bit"
    (the same, paged to host memory under pressure; CUDA only, plain 8-bit on the CPU)."""
    fused_loss: bool = True
    """CE + KL straight from hidden states in token chunks (no [tokens x vocab] logits); false = the plain
    full-logits path, kept as the reference."""
    w_ce: float = 1.0
    """Weight of the cross-entropy on the hard labels."""
    w_kl: float = 1.0
    """Weight of KL(teacher || student) over the cached top-k + tail bucket (0 skips it)."""
    w_ot: float = 0.1
    """Weight of the sequence-level OT between student and projected teacher final hidden states (0 skips it;
    > 0 needs a cache with hidden states)."""
    w_ot_logits: float = 0.1
    """Weight of the sequence-level OT between student and teacher next-token distributions (0 skips it)."""
    temperature: float = 1.0
    """KL temperature (student logits / tau, teacher bucket log-probs / tau, loss x tau^2)."""
    kl_tail: str = "bucket"
    """"bucket" (top-k + one tail bucket on both sides) or "none" (both renormalised over the teacher's top-k)."""
    kl_reverse: bool = False
    """Use KL(student || teacher) over the same buckets instead of KL(teacher || student)."""
    ot_eps: float = 0.05
    """Entropic regularisation of both OT losses (the seeds' 1/lambda; see pipeline/losses/ot.py for why not 10)."""
    ot_objective: str = "linear"
    """"linear" (<T*, C>, the seeds' loss, exact implicit gradient) or "regularized" (<T*, C> - eps H(T*))."""
    ot_max_iter: int = 300
    """Cap on Sinkhorn iterations per step (the logged iteration count shows whether it is reached)."""
    epochs: float = 6.0
    """Passes over the cached training split."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = run all epochs)."""
    lr: float = 2e-3
    """Peak learning rate of the student weights (or adapters) and of P (cosine schedule with warmup)."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (CE/KL stay token means over the whole step)."""
    warmup_ratio: float = 0.05
    """Fraction of steps spent warming the learning rate up."""
    num_workers: int = 2
    """DataLoader worker processes reading the Zarr cache (0 = read in the training process)."""
    logging_steps: int = 10
    """Optimizer steps between two logged (and plotted) points."""
    save_steps: int = 0
    """Write a resumable checkpoint to `<out>/checkpoints` every this many steps (0 = only the final save)."""
    resume: bool = False
    """Continue from the newest checkpoint in `<out>/checkpoints` if there is one (model, P, optimizer, schedule,
    RNG, data position)."""
    eval_steps: int = 0
    """Evaluate every component on the validation cache every this many steps (0 = never during training)."""


@dataclass
class EvalConfig:
    """`python -m stages.evaluate`: teacher vs students on held-out data and on the validation cache."""

    models: dict[str, str] = field(default_factory=lambda: {
        "teacher": "artifacts/teacher", "student_base": "artifacts/base/student",
        "student_ce": "artifacts/student_ce", "student_distilled": "artifacts/student"})
    """Name -> checkpoint folder (plain model or a Stage 2 output with a LoRA adapter), in table order."""
    cache: str = "artifacts/cache"
    """Folder with Stage 1's `validation.zarr`: top-1 agreement and KL(teacher || model) are measured on it."""
    plots: str = "artifacts/plots"
    """Folder with the Stage 2 loss curves (`train_*.tsv`) drawn into curves.png."""
    out: str = "artifacts/metrics"
    """Folder receiving metrics.json (DVC metrics), metrics.md and curves.png."""
    eval_examples: int = 200
    """Test examples used for task accuracy by greedy generation (0 = all); perplexity uses the whole test split."""
    max_new_tokens: int = 32
    """Generation budget per answer."""
    batch_size: int = 32
    """Sequences per forward for perplexity, cache metrics and generation."""
    load_in_bits: int = 16
    """Quantisation of plain checkpoints (teacher, base student) when loaded for evaluation: 4, 8 or 16."""
    dtype: str = "auto"
    """Compute dtype for evaluation: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32"."""


@dataclass
class Config:
    """Everything params.yaml holds."""

    seed: int = 0
    """Seed for data generation, splits and training."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


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
    """Parse an override string as the type of the field it replaces (YAML for lists and mappings)."""
    if isinstance(current, str):  # paths and names stay verbatim ("007" is not 7)
        return text
    try:
        if isinstance(current, bool):
            value = yaml.safe_load(text)
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)  # also "1e-4", which YAML 1.1 would read as a string
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        raise ValueError(f"expected a value like {current!r}, got {text!r}") from None


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

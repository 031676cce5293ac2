"""Typed configuration: one dataclass per stage, loaded from params.yaml, overridable per field, validated.

`params.yaml` is the single source of truth that DVC tracks, and the dataclass defaults below equal it
(tests/test_config.py fails when they drift), so `Config()` is the embedded default too. Each stage's CLI may
override single values (`--set cache.k=32`, `--set distill.lora.r=8` or a named option), and the resolved config
is saved next to the stage's output so an artifact always says how it was made.

Every value is checked when a dataclass is built (from YAML, from `--set`, or in code): its type from the
annotation (a `Literal` lists the allowed choices) by one generic validator, `_check_fields`, and its range by
each section's `__post_init__`. A typo thus fails in well under a second, naming the field and what it allows,
before torch is imported or a model loads. Attributes assigned after construction are not re-checked; saving and
reloading the config (what every stage CLI does) checks them.
"""
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml

from cache.errors import OtkdError


class ConfigError(OtkdError, ValueError):
    """A parameter is unknown, of the wrong type, or out of its allowed range (the message names it)."""


NON_EMPTY = "non-empty"
PathStr = Annotated[str, NON_EMPTY]
"""A local path or a hub model name: any string but the empty one (an empty path would silently mean the current
directory)."""
Bits = Literal[4, 8, 16]
"""How a model's weights are loaded with bitsandbytes: 4 (NF4, double quantisation), 8 (LLM.int8) or 16 (not
quantised: the checkpoint's own weights in `dtype`)."""
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
"""Compute dtype of a loaded model (also the 4-bit compute dtype): "auto" = bf16 on a GPU that supports it, fp32
on the CPU (bf16 matmuls are slow there); or "bf16", "fp16", "fp32" explicitly."""
HIDDEN_CODEC = re.compile(r"bf16|fp16|int8|none|(pca|svd|fisher):[1-9][0-9]*")
"""The values of cache.hidden_codec (pipeline/teacher/codecs.py)."""
Optim = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
"""The transformers `optim` names that Stage 2 and the VRAM planner (pipeline/planning/memory.py) know."""


def _check_value(hint, value, name: str):
    """`value` checked against the annotation `hint`; returned normalised (an int where a float is expected becomes
    a float, a tuple where a list is expected a list), so that a config compares and saves the same however it
    was written."""
    extras = ()
    if get_origin(hint) is Annotated:
        hint, *extras = get_args(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        # type must match too: True == 1 and 16.0 == 16, but neither is a valid choice
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_check_value(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {_check_value(args[0], k, f"{name} key"): _check_value(args[1], v, f"{name}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(f"{name} must be a {hint.__name__}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            hint_1e = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint_1e = " (YAML reads 1e-4 as a string: write 1.0e-4)"
                except ValueError:
                    pass
            raise ConfigError(f"{name} must be a finite number, got {value!r}{hint_1e}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if NON_EMPTY in extras and not value.strip():
        raise ConfigError(f"{name} must not be empty")
    return value


@functools.cache
def _hints(cls) -> dict:
    return get_type_hints(cls, include_extras=True)


def _check_fields(obj) -> None:
    """The generic half of validation, run first by every section's __post_init__: each field against its type
    annotation (Literal choices, numbers, strings, lists, mappings, nested sections), normalised in place."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _check_value(hints[f.name], value, f.name)
        if checked is not value:
            setattr(obj, f.name, checked)


def _require(ok: bool, name: str, what: str, value: Any) -> None:
    """The explicit half: one range rule, e.g. _require(k >= 1, "k", ">= 1", k)."""
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def _fraction(obj, *names: str) -> None:
    for n in names:
        _require(0 <= getattr(obj, n) < 1, n, "in [0, 1)", getattr(obj, n))


def _at_least(obj, low: int, *names: str) -> None:
    for n in names:
        _require(getattr(obj, n) >= low, n, f">= {low}", getattr(obj, n))


def _positive(obj, *names: str) -> None:
    for n in names:
        _require(getattr(obj, n) > 0, n, "> 0", getattr(obj, n))


# slots=True: assigning a misspelt or removed field (cfg.distill.lora_r = 8) raises AttributeError instead of
# silently adding an attribute that nothing reads.
@dataclass(slots=True)
class ModelShape:
    """Size of a tiny Qwen2 model built from scratch for the embedded default."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size must divide by it)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen2; num_heads must divide by it)."""
    intermediate_size: int = 512
    """Width of the MLP."""

    def __post_init__(self):
        _check_fields(self)
        _at_least(self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size", f"a multiple of num_heads={self.num_heads}",
                 self.hidden_size)
        _require(self.num_heads % self.num_kv_heads == 0, "num_heads",
                 f"a multiple of num_kv_heads={self.num_kv_heads}", self.num_heads)


@dataclass(slots=True)
class LoraSettings:
    """LoRA adapters (Hu et al. 2021) as peft builds them: the teacher's SFT (`finetune.lora`) and the student's
    Stage 2 (`distill.lora`) share these fields, with their own defaults; used only with mode=lora."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Modules that get LoRA adapters: all attention and MLP projections, as in the user's original design notes."""

    def __post_init__(self):
        _check_fields(self)
        _at_least(self, 1, "r", "alpha")
        _fraction(self, "dropout")
        _require(bool(self.target_modules), "target_modules", "a non-empty list", self.target_modules)


@dataclass(slots=True)
class PrepareConfig:
    """The embedded default: a synthetic task, a locally trained tokenizer and tiny random-init models."""

    out_data: PathStr = "artifacts/data/task.jsonl"
    """Where the synthetic instruction dataset is written (JSONL, the user's own data format)."""
    out_models: PathStr = "artifacts/base"
    """Folder receiving `tokenizer/`, `teacher/` and `student/` (Hugging Face format, random weights)."""
    task: Literal["digit_sum", "split"] = "split"
    """The synthetic task (pipeline/data/task.py): "digit_sum" (one right answer; the teacher is nearly one-hot) or
    "split" (N -> any "a + b" with a + b = N, the user's own task; the teacher keeps spread soft targets)."""
    n_examples: int = 20000
    """Number of synthetic examples (before the train/validation/test split)."""
    n_digits: int = 4
    """digit_sum: digits per instruction; split: digits of N (its leading digit >= 2). Fewer is easier."""
    tokenizer_vocab: int = 512
    """Target size of the byte-level BPE vocabulary trained on the synthetic corpus (BPE runs out of merges at
    ~389 tokens on the default corpus, so larger values change nothing)."""
    vocab_multiple: int = 64
    """Model vocab = tokenizer size rounded up to this multiple: padded logits, like Qwen2.5's."""
    teacher: ModelShape = field(default_factory=lambda: ModelShape(128, 4, 4, 2, 512))
    """Shape of the tiny teacher."""
    student: ModelShape = field(default_factory=lambda: ModelShape(64, 2, 4, 2, 256))
    """Shape of the tiny student (clearly smaller than the teacher)."""
    other_tokenizer_vocab: int = 448
    """Vocabulary of the second byte-level BPE tokenizer (`<out_models>/tokenizer_x`) that the cross-tokenizer student
    (`<out_models>/student_x`, shape `student`) uses: other merges and size than the teacher's, digits in pairs
    ("2631" -> 26 31) instead of one per token, so most sequences have another length on each side."""

    def __post_init__(self):
        _check_fields(self)
        _at_least(self, 1, "n_examples", "n_digits", "tokenizer_vocab", "vocab_multiple", "other_tokenizer_vocab")
        _require(self.task != "split" or self.n_digits >= 2, "n_digits", ">= 2 for the split task (N >= 10)",
                 self.n_digits)


@dataclass(slots=True)
class DataConfig:
    """Instruction data and how it becomes supervised token sequences."""

    path: PathStr = "artifacts/data/task.jsonl"
    """JSONL with {"instruction", "input", "output"} per line, or a local .json/.parquet Alpaca-style file."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt format: "alpaca" (the Alpaca template + EOS) or "chat" (the tokenizer's chat template)."""
    max_length: int = 128
    """Longest tokenised example; longer ones are truncated (counted and reported)."""
    val_fraction: float = 0.05
    """Share of examples in the validation split (chosen by a hash of the sample id, so order-independent)."""
    test_fraction: float = 0.1
    """Share of examples in the test split (held out from every training stage)."""
    metric: Literal["exact", "split", "embedded_task"] = "embedded_task"
    """How a generated answer is judged: "exact" (equals the output), "split" (any "a + b" that sums to the
    instruction's number, the user's own task) or "embedded_task" (the synthetic tasks' rules)."""
    limit: int = 0
    """Use only the first `limit` records of the file (0 = all): 3000 takes the original design's alpaca-cleaned slices
    train[:2000] + train[2000:3000]; the splits inside them are still chosen by sample id."""

    def __post_init__(self):
        _check_fields(self)
        _at_least(self, 1, "max_length")
        _at_least(self, 0, "limit")
        _fraction(self, "val_fraction", "test_fraction")
        _require(self.val_fraction + self.test_fraction < 1, "val_fraction + test_fraction", "< 1 (no training "
                 "examples would be left)", self.val_fraction + self.test_fraction)


@dataclass(slots=True)
class FinetuneConfig:
    """Supervised fine-tuning of the teacher on the task (step 1 of the original design), before it is cached."""

    base: PathStr = "artifacts/base/teacher"
    """Model to fine-tune: a local folder or a hub name."""
    out: PathStr = "artifacts/teacher"
    """Where the fine-tuned (and, for LoRA, merged) teacher is saved as a plain checkpoint."""
    metrics: PathStr = "artifacts/metrics/teacher.json"
    """Where the teacher's held-out accuracy is written (a DVC metric; outside `out`, DVC outputs can't nest)."""
    mode: Literal["lora", "full"] = "full"
    """"lora" (LoRA SFT then merge_and_unload, as in the original design) or "full" (for the from-scratch tiny teacher)."""
    epochs: float = 3.0
    """Passes over the training split."""
    lr: float = 2e-3
    """Peak learning rate (cosine schedule with warmup)."""
    batch_size: int = 64
    """Sequences per optimizer step."""
    warmup_ratio: float = 0.05
    """Fraction of steps spent warming the learning rate up, in [0, 1)."""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=16, dropout=0.0))
    """LoRA settings (mode=lora)."""
    eval_examples: int = 500
    """Test examples used for the teacher's task accuracy after training (0 = all)."""

    def __post_init__(self):
        _check_fields(self)
        _positive(self, "epochs", "lr")
        _at_least(self, 1, "batch_size")
        _fraction(self, "warmup_ratio")
        _at_least(self, 0, "eval_examples")


@dataclass(slots=True)
class CacheConfig:
    """Stage 1: run the teacher once and store its top-k distribution (and hidden state) per supervised token."""

    teacher: PathStr = "artifacts/teacher"
    """Teacher checkpoint: a local folder or a hub name (e.g. Qwen/Qwen2.5-7B)."""
    out: PathStr = "artifacts/cache"
    """Folder receiving one Zarr v3 store per split (`train.zarr`, `validation.zarr`), or an fsspec URL
    (s3://bucket/prefix, gs://..., file://...; credentials from the environment): README "Caches on shared and object
    storage"."""
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
    no exact teacher in Stage 2). pipeline/teacher/codecs.py and README "Hidden-state codecs" say what each loses."""
    hidden_calibration_rows: int = 16384
    """Rows of the train split (spread over it) on which a pca/fisher basis is fitted, in a teacher pass of their own."""
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
        _check_fields(self)
        _require(bool(self.splits) and len(set(self.splits)) == len(self.splits), "splits",
                 "a non-empty list without repeats", self.splits)
        _at_least(self, 1, "k", "batch_tokens", "chunk_rows", "shard_rows", "hidden_calibration_rows")
        _require(HIDDEN_CODEC.fullmatch(self.hidden_codec) is not None, "hidden_codec",
                 "bf16, fp16, int8, pca:<r>, svd:<r>, fisher:<r> (r >= 1) or none", self.hidden_codec)


@dataclass(slots=True)
class DistillConfig:
    """Stage 2: train the student alone against the streamed teacher cache (CE + KL + OT, weights below)."""

    student: PathStr = "artifacts/base/student"
    """Student checkpoint: a local folder or a hub name (e.g. unsloth/Qwen2.5-1.5B-bnb-4bit's base). Must share
    the teacher's tokenizer (checked against the cache by tokenizer hash) unless cross_tokenizer is true."""
    cross_tokenizer: bool = False
    """Distil across tokenizers: the student tokenizes the records of data.path itself (its own template, joined to
    the cache by sample_id) and the teacher's rows are aligned to its own by the text (pipeline/distill/crosstok.py).
    Then w_kl is the KL at positions where both tokenizations start the predicted token at the same byte of the
    answer, over teacher ids mapped to identical student strings (+ a tail bucket); w_ot_logits the OT over mapped
    ids; w_ot the hidden-state OT between the two sequences (N != M). Needs a cache written with the teacher's
    tokenizer beside it (Stage 1 does since this option exists). Off: a cache made with another tokenizer is
    refused."""
    cache: PathStr = "artifacts/cache"
    """Folder (or fsspec URL, like cache.out) holding Stage 1's `train.zarr` (and `validation.zarr`, used for the
    periodic eval if eval_steps > 0)."""
    out: PathStr = "artifacts/student"
    """Where the trained student is saved: full weights (mode=full) or the LoRA adapter (mode=lora), plus
    `projection.pt` (the learned teacher->student projection P, when w_ot > 0) and `config.yaml`."""
    plots: PathStr = "artifacts/plots"
    """Folder receiving the loss curves `train_<name of out>.tsv` (one row per logging step; DVC plots)."""
    mode: Literal["full", "lora"] = "full"
    """"lora" (LoRA adapters on a frozen, optionally 4-bit base: the real-model setting) or "full" (every weight
    trains: the random-init tiny student of the embedded default learns little through LoRA)."""
    load_in_bits: Bits = 16
    """Load the student quantised with bitsandbytes (see `Bits`); 4 (NF4: QLoRA) and 8 need mode=lora, since
    quantised weights cannot train themselves."""
    dtype: Dtype = "auto"
    """Student compute dtype, also the 4-bit compute dtype (see `Dtype`)."""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05))
    """LoRA settings (mode=lora)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time); for real models on one GPU."""
    optim: Optim = "adamw_torch"
    """Optimizer (a transformers `optim` name): "adamw_torch" (two moments in the parameter's dtype: 8 B per fp32
    LoRA parameter), "adamw_8bit" (bitsandbytes 8-bit moments, ~2 B; the original design's AdamW8bit) or "paged_adamw_8bit"
    (the same, paged to host memory under pressure; CUDA only, plain 8-bit on the CPU)."""
    w_ce: float = 1.0
    """Weight of the cross-entropy on the hard labels (every weight >= 0, not all 0)."""
    w_kl: float = 1.0
    """Weight of KL(teacher || student) over the cached top-k + tail bucket, or over the whole vocabulary when
    teacher_head is set (0 skips it)."""
    teacher_head: str = ""
    """The teacher checkpoint (local folder or hub name) whose lm_head rebuilds the teacher's exact distribution
    softmax(W h) from the cached hidden states: then w_kl is the full-vocabulary KL (no top-k, no tail bucket,
    temperature on the true logits), computed in row chunks. Only lm_head is read (pipeline/teacher/head.py), checked
    against the cache's provenance. Needs a cache with hidden states and the same tokenizer. "" = top-k KL."""
    jsd_beta: float = 0.0
    """With teacher_head: 0 = KL in the direction kl_reverse says; in (0, 1) the generalised Jensen-Shannon
    divergence beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (p teacher, q student)."""
    w_ot: float = 0.1
    """Weight of the sequence-level OT between student and projected teacher final hidden states (0 skips it;
    > 0 needs a cache with hidden states)."""
    w_ot_logits: float = 0.1
    """Weight of the sequence-level OT between student and teacher next-token distributions (0 skips it)."""
    w_uld: float = 0.0
    """Weight of ULD (Boizard et al. 2024): the L1 distance between the student's and the teacher's sorted top-k
    probabilities (+ the tail), position by position; tokenizer-agnostic, the cross-tokenizer baseline (0 skips it)."""
    w_tok_ot: float = 0.0
    """Weight of the token-level OT in embedding geometry (the original design's hybrid): per aligned position, OT
    between the student's top tok_ot_k next-token distribution placed at its embedding rows and the teacher's
    cached top-k at its embedding rows projected by a learned P_e; cost 1 - cosine. Needs no string map (0 skips it)."""
    tok_ot_k: int = 8
    """Student tokens (its own top-k) in the token-level OT."""
    tok_ot_eps: float = 0.1
    """Entropic regularisation of the token-level OT (cost in [0, 2]), > 0."""
    tok_ot_adaptive_temp: bool = False
    """Token-level OT on softmax(z / (temperature x std(z))) per row (the original design's adaptive temperature)
    instead of softmax(z / temperature)."""
    temperature: float = 1.0
    """KL temperature, > 0 (student logits / tau, teacher bucket log-probs / tau, loss x tau^2)."""
    kl_tail: Literal["bucket", "none"] = "bucket"
    """"bucket" (top-k + one tail bucket on both sides) or "none" (both renormalised over the teacher's top-k)."""
    kl_reverse: bool = False
    """Use KL(student || teacher) over the same buckets instead of KL(teacher || student)."""
    ot_eps: float = 0.05
    """Entropic regularisation of both OT losses, > 0: 1/lambda in the original design's <T,C> - (1/lambda) H(T)
    (see pipeline/losses/ot.py for why not its lambda = 0.1)."""
    ot_objective: Literal["linear", "regularized"] = "linear"
    """"linear" (<T*, C>, the original design's loss, exact implicit gradient) or "regularized"
    (<T*, C> - eps H(T*))."""
    ot_eps_scale: Literal["absolute", "std"] = "absolute"
    """"absolute" (ot_eps as is) or "std" (ot_eps x the standard deviation of each sequence's cost, OTT-JAX's
    relative epsilon: the same sharpness at every sequence length, since C = 1 - rowsoftmax has a spread that
    shrinks like 1/M). Default absolute: the embedded default's results were measured with it. Measured on the
    embedded task at initialisation (~7 supervised tokens per sequence): std(C) of the hidden-state cost is
    0.06-0.12 per sequence, so ot_eps = 0.6 under "std" is about 0.05 absolute; the logits cost of an untrained
    student is nearly constant (std < 1e-4), which "std" turns into an ordinary problem instead of a uniform plan."""
    ot_tol: float = 1e-5
    """L1 marginal error (rows + columns, total mass 1) at which Sinkhorn stops, > 0. float32 reaches ~1e-6 at
    best; the gradient error follows it (bench/sinkhorn_bench.py: ~1e-4 at 1e-5, ~1e-5 at 1e-6)."""
    ot_max_iter: int = 300
    """Cap on Sinkhorn iterations + Newton steps per sequence and OT loss (logged: sinkhorn_capped_* is the share
    of sequences that did not reach ot_tol)."""
    epochs: float = 1.4
    """Passes over the cached training split (the embedded default's 1.4 leaves the CE-only student visibly short
    of the teacher: it is the budget the distillation terms are judged at)."""
    train_fraction: float = 1.0
    """Share of the cached training sequences used, as whole blocks of batch_size neighbours chosen by a hash of
    their first sample id: deterministic, nested (the 10% blocks are inside the 30%), reads stay contiguous. For
    data-efficiency curves; set max_steps to compare at equal steps."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = run all epochs)."""
    lr: float = 2e-3
    """Peak learning rate of the student weights (or adapters) and of P (cosine schedule with warmup)."""
    batch_size: int = 64
    """Sequences per micro-batch, per process (one block of neighbouring cache entries). Data-parallel (torchrun /
    accelerate launch): the optimizer step takes batch_size x processes x grad_accum sequences."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and process (CE/KL stay token means over the whole step, OT terms
    sequence means, across all processes)."""
    warmup_ratio: float = 0.05
    """Fraction of steps spent warming the learning rate up, in [0, 1)."""
    num_workers: int = 0
    """DataLoader worker processes reading the Zarr cache (0 = read in the training process; 2-4 on a GPU
    machine, while on a 2-core CPU workers only compete with training)."""
    logging_steps: int = 10
    """Optimizer steps between two logged (and plotted) points."""
    save_steps: int = 0
    """Write a resumable checkpoint to `<out>/checkpoints` every this many steps (0 = only the final save)."""
    resume: bool = False
    """Continue from the newest checkpoint in `<out>/checkpoints` if there is one (model, P, optimizer, schedule,
    RNG, data position)."""
    eval_steps: int = 0
    """Evaluate every component on the validation cache every this many steps (0 = never during training)."""
    report_to: Literal["none", "tensorboard"] = "none"
    """Where Trainer logs go besides the TSV curves: none, or tensorboard (event files, written offline, under
    `<out>/checkpoints/runs`; needs the `tensorboard` package: `pip install otkd[tensorboard]`)."""

    @property
    def weights(self) -> dict[str, float]:
        """Every loss weight, by field name: the fields named w_<term>."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("w_")}

    def __post_init__(self):
        _check_fields(self)
        # full training updates every weight: bitsandbytes' quantised weights have no gradient
        if self.load_in_bits != 16 and self.mode != "lora":
            raise ConfigError(f"load_in_bits={self.load_in_bits} needs mode='lora' (quantised weights cannot train, "
                              f"LoRA adapters on them can: QLoRA), got mode={self.mode!r}")
        for n, w in self.weights.items():
            _require(w >= 0, n, ">= 0", w)
        if not any(self.weights.values()):
            raise ConfigError(f"{', '.join(self.weights)} are all 0: nothing would train (set one > 0)")
        _positive(self, "temperature", "ot_eps", "ot_tol", "epochs", "lr", "tok_ot_eps")
        _at_least(self, 1, "ot_max_iter", "tok_ot_k", "batch_size", "grad_accum", "logging_steps")
        _at_least(self, 0, "num_workers", "save_steps", "eval_steps")
        _require(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "-1 (all epochs) or >= 1",
                 self.max_steps)
        _require(0 < self.train_fraction <= 1, "train_fraction", "in (0, 1]", self.train_fraction)
        if self.cross_tokenizer and (self.kl_reverse or self.kl_tail != "bucket"):
            raise ConfigError("cross_tokenizer=true computes the forward KL over mapped buckets + a tail bucket: "
                              f"kl_reverse must be false and kl_tail 'bucket' (got {self.kl_reverse}, {self.kl_tail!r})")
        _fraction(self, "warmup_ratio", "jsd_beta")
        if self.teacher_head and self.cross_tokenizer:
            raise ConfigError("teacher_head (the exact teacher from its hidden states) needs the teacher's vocabulary "
                              "on the student side: it cannot be combined with cross_tokenizer=true")
        if self.jsd_beta and (not self.teacher_head or self.kl_reverse):
            raise ConfigError(f"jsd_beta={self.jsd_beta} needs teacher_head (the exact teacher) and kl_reverse=false")


@dataclass(slots=True)
class EvalConfig:
    """`python -m stages.evaluate`: teacher vs students on held-out data and on the validation cache."""

    models: dict[str, PathStr] = field(default_factory=lambda: {
        "teacher": "artifacts/teacher", "student_base": "artifacts/base/student",
        "student_ce": "artifacts/student_ce", "student_distilled": "artifacts/student",
        "student_x_ce": "artifacts/student_x_ce", "student_x": "artifacts/student_x"})
    """Name -> checkpoint folder (plain model or a Stage 2 output with a LoRA adapter), in table order; the first
    is the teacher. Each model is evaluated with its own tokenizer (a cross-tokenizer student in its own tokens)."""
    cache: PathStr = "artifacts/cache"
    """Folder with Stage 1's `validation.zarr`: top-1 agreement and KL(teacher || model) are measured on it."""
    plots: PathStr = "artifacts/plots"
    """Folder with the Stage 2 loss curves (`train_*.tsv`) drawn into curves.png."""
    out: PathStr = "artifacts/metrics"
    """Folder receiving metrics.json (DVC metrics), metrics.md and curves.png."""
    eval_examples: int = 500
    """Test examples used for task accuracy by greedy generation (0 = all); perplexity uses the whole test split."""
    max_new_tokens: int = 16
    """Generation budget per answer."""
    batch_size: int = 64
    """Sequences per forward for perplexity, cache metrics and generation."""
    load_in_bits: Bits = 16
    """Quantisation of plain checkpoints (teacher, base student) when loaded for evaluation (see `Bits`)."""
    dtype: Dtype = "auto"
    """Compute dtype for evaluation (see `Dtype`)."""

    def __post_init__(self):
        _check_fields(self)
        _require(bool(self.models), "models", "a non-empty mapping (name -> checkpoint)", self.models)
        _at_least(self, 0, "eval_examples")
        _at_least(self, 1, "max_new_tokens", "batch_size")


@dataclass(slots=True)
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

    def __post_init__(self):
        _check_fields(self)


def _default(cls, name: str):
    """The default value of field `name` of dataclass `cls` (calling its factory)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors, and
    every value is validated (by the dataclasses' __post_init__) with its full dotted name in the message."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {values!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown parameter {where + '.' if where else ''}{unknown[0]} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        t = hints[name]
        if dataclasses.is_dataclass(t) and not isinstance(value, t):
            if isinstance(value, dict):
                # missing keys of a nested group take the *section's* default (distill.lora's alpha is 32, the
                # LoraSettings class default 16), not the group class's
                value = {**dataclasses.asdict(_default(cls, name)), **value}
            value = _build(t, value, f"{where}.{name}".strip("."))  # a non-mapping fails there, named
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by cls's own checks, which know only the field's name in cls
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


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
        raise ConfigError(f"expected a value like {current!r}, got {text!r}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings (the CLI's --set; `distill.lora.r=8` reaches into a group) to a
    config, in place, and validate the result as a whole (so a choice or range error names the field).

    Works on a plain-dict copy and rebuilds the dataclasses from it: __post_init__'s checks run again, and
    `cfg` is left unchanged if any override is invalid."""
    values = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        *parents, leaf = key.strip().split(".")
        obj, node = cfg, values  # obj: which names exist (dataclass fields); node: the values being edited
        for p in parents:
            if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
                raise ConfigError(f"unknown parameter {key}")
            obj, node = getattr(obj, p), node[p]
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown parameter {key}")
        try:
            value = _coerce(text, node[leaf])
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        if dataclasses.is_dataclass(getattr(obj, leaf)) and isinstance(value, dict):
            value = {**node[leaf], **value}  # --set distill.lora='{r: 8}' keeps the group's other values
        node[leaf] = value
    new = _build(type(cfg), values, "")
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(new, f.name))
    return cfg


def load_config(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    """Read params.yaml (missing sections and fields take their defaults), apply CLI overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        cfg = _build(Config, values, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (or one section of it) as YAML next to a stage's output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

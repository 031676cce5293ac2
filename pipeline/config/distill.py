"""The `distill` section: Stage 2, the student trained alone against the streamed teacher cache."""

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pipeline.config.base import (
    Bits,
    ConfigError,
    Dtype,
    LoraSettings,
    PathStr,
    at_least,
    check_fields,
    fraction,
    positive,
    require,
)
from pipeline.config.data import DataConfig

TEACHER_TERMS = ("w_kl", "w_ot", "w_ot_logits", "w_uld", "w_tok_ot", "w_chunk_kl", "w_alm")
"""The weights of the terms that read the teacher; all 0 = plain fine-tuning on the cached data (the CE-only
baseline)."""
TEACHER_SETTINGS = (
    "teacher_head",
    "jsd_beta",
    "temperature",
    "kl_tail",
    "kl_reverse",
    "tok_ot_k",
    "tok_ot_eps",
    "tok_ot_adaptive_temp",
    "ot",
    "ot_logits_temperature",
)
"""The settings that only those terms read: a run with every teacher weight 0 does not depend on them, so its DVC
stage does not list them (tests/test_dvc_deps.py; tests/test_distill.py checks they change nothing)."""

Optim = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
"""The transformers `optim` names that Stage 2 and the VRAM planner (pipeline/planning/memory.py) know."""


@dataclass(slots=True)
class OTConfig:
    """`distill.ot`: the entropic OT solver shared by the hidden-state and the logits OT terms (Stage 2 passes it to
    the losses as one `pipeline.losses.ot.OTSolver`)."""

    eps: float = 0.05
    """Entropic regularisation, > 0: the plan of <T, C> - eps H(T). With C in [0, 1], eps = 10 (a "lambda = 0.1" read
    as 1/eps) would give a uniform plan that sees only mean(C); 0.05 is OTT-JAX's relative default scale."""
    objective: Literal["linear", "regularized"] = "linear"
    """"linear" (<T*, C>, exact implicit gradient) or "regularized" (<T*, C> - eps H(T*), gradient T*)."""
    eps_scale: Literal["absolute", "std"] = "absolute"
    """"absolute" (eps as is) or "std" (eps x the standard deviation of each sequence's cost, OTT-JAX's relative
    epsilon: the same sharpness at every sequence length, since C = 1 - rowsoftmax has a spread that shrinks like
    1/M). Default absolute: the embedded default's results were measured with it. Measured on the embedded task at
    initialisation (~7 supervised tokens per sequence): std(C) of the hidden-state cost is 0.06-0.12 per sequence,
    so eps = 0.6 under "std" is about 0.05 absolute; the logits cost of an untrained student is nearly constant
    (std < 1e-4), which "std" turns into an ordinary problem instead of a uniform plan."""
    tol: float = 1e-5
    """L1 marginal error (rows + columns, total mass 1) at which Sinkhorn stops, > 0. float32 reaches ~1e-6 at
    best; the gradient error follows it (bench/sinkhorn_bench.py: ~1e-4 at 1e-5, ~1e-5 at 1e-6)."""
    max_iter: int = 300
    """Cap on Sinkhorn iterations + Newton steps per sequence and OT loss (logged: sinkhorn_capped_* is the share
    of sequences that did not reach tol)."""

    def __post_init__(self):
        check_fields(self)
        positive(self, "eps", "tol")
        at_least(self, 1, "max_iter")


@dataclass(slots=True)
class DistillConfig:
    """Stage 2: train the student alone against the streamed teacher cache (CE + KL + OT, weights below)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "ot_eps": "ot.eps",
        "ot_objective": "ot.objective",
        "ot_eps_scale": "ot.eps_scale",
        "ot_tol": "ot.tol",
        "ot_max_iter": "ot.max_iter",
    }  # params written before the OT solver settings became one group

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
    LoRA parameter), "adamw_8bit" (bitsandbytes 8-bit moments, ~2 B: a quarter of the optimizer state) or
    "paged_adamw_8bit"
    (the same, paged to host memory under pressure; CUDA only, plain 8-bit on the CPU)."""
    w_ce: float = 1.0
    """Weight of the cross-entropy on the hard labels (every weight >= 0, not all 0)."""
    w_kl: float = 1.0
    """Weight of KL(teacher || student) over the cached top-k + tail bucket, or over the whole vocabulary when
    teacher_head is set (0 skips it)."""
    teacher_head: str = ""
    """The teacher checkpoint (local folder or hub name) whose lm_head rebuilds the teacher's exact distribution
    softmax(W h) from the cached hidden states: then w_kl is the full-vocabulary KL (no top-k, no tail bucket,
    temperature on the true logits), computed in row chunks. Only lm_head is read (pipeline/distill/head.py), checked
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
    """Weight of the token-level OT in embedding geometry (a hybrid: position by position like the KL, with OT's
    cost between tokens, so mass on a token with a similar embedding costs less than on an unrelated one): per
    aligned position, OT between the student's top tok_ot_k next-token distribution placed at its embedding rows
    and the teacher's cached top-k at its embedding rows projected by a learned P_e; cost 1 - cosine. Needs no
    string map (0 skips it)."""
    w_chunk_kl: float = 0.0
    """Cross-tokenizer only: weight of the chunk-level KL (pipeline/losses/chunk.py) - at each student row whose token
    is made of whole teacher tokens, KL between the teacher's exact probabilities of the events the student can emit
    there (completions of the observed prefix, first pieces, the rest), built from the cache, and the student's own
    probabilities of the same events. Needs a cache of schema >= 4 (observed log-probs) (0 skips it)."""
    w_alm: float = 0.0
    """Cross-tokenizer only: weight of chunk likelihood matching (ALM-style): per span both tokenizations start and
    end at, the binary KL between the teacher's and the student's probability of the observed span. Needs a cache
    of schema >= 4 (0 skips it)."""
    tok_ot_k: int = 8
    """Student tokens (its own top-k) in the token-level OT."""
    tok_ot_eps: float = 0.1
    """Entropic regularisation of the token-level OT (cost in [0, 2]), > 0."""
    tok_ot_adaptive_temp: bool = False
    """Token-level OT on softmax(z / (temperature x std(z))) per row (an adaptive temperature: rows of differently
    scaled logits give distributions of comparable sharpness) instead of softmax(z / temperature)."""
    temperature: float = 1.0
    """KL temperature, > 0 (student logits / tau, teacher bucket log-probs / tau, loss x tau^2)."""
    kl_tail: Literal["bucket", "none"] = "bucket"
    """"bucket" (top-k + one tail bucket on both sides) or "none" (both renormalised over the teacher's top-k)."""
    kl_reverse: bool = False
    """Use KL(student || teacher) over the same buckets instead of KL(teacher || student)."""
    ot: OTConfig = field(default_factory=OTConfig)
    """How both sequence-level OT losses solve their transport problems (`distill.ot.*`)."""
    ot_logits_temperature: float = 1.0
    """Score temperature of the OT-on-logits cost, > 0: C = 1 - softmax_j(S_ij / t). Its similarity S (the chance
    that two positions emit the same token) lies in [0, 1], so at t = 1 every row of C sits near 1 - 1/M (a flat
    cost: Stage 2 warns); below 1 the cost separates the teacher tokens a student position matches."""
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
    """Evaluate every component on the validation cache every this many steps (0 = never during training); the
    evaluations go to `<plots>/eval_<name of out>.tsv`."""
    eval_fraction: float = 1.0
    """Share of the validation cache those evaluations read (whole blocks, always the same ones)."""
    report_to: Literal["none", "tensorboard"] = "none"
    """Where Trainer logs go besides the TSV curves: none, or tensorboard (event files, written offline, under
    `<out>/checkpoints/runs`; needs the `tensorboard` package: `pip install otkd[tensorboard]`)."""

    @property
    def weights(self) -> dict[str, float]:
        """Every loss weight, by field name: the fields named w_<term>."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("w_")}

    def __post_init__(self):
        check_fields(self)
        # full training updates every weight: bitsandbytes' quantised weights have no gradient
        if self.load_in_bits != 16 and self.mode != "lora":
            raise ConfigError(
                f"load_in_bits={self.load_in_bits} needs mode='lora' (quantised weights cannot train, "
                f"LoRA adapters on them can: QLoRA), got mode={self.mode!r}"
            )
        for n, w in self.weights.items():
            require(w >= 0, n, ">= 0", w)
        if not any(self.weights.values()):
            raise ConfigError(f"{', '.join(self.weights)} are all 0: nothing would train (set one > 0)")
        positive(self, "temperature", "epochs", "lr", "tok_ot_eps", "ot_logits_temperature")
        at_least(self, 1, "tok_ot_k", "batch_size", "grad_accum", "logging_steps")
        at_least(self, 0, "num_workers", "save_steps", "eval_steps")
        require(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "-1 (all epochs) or >= 1", self.max_steps)
        require(0 < self.train_fraction <= 1, "train_fraction", "in (0, 1]", self.train_fraction)
        require(0 < self.eval_fraction <= 1, "eval_fraction", "in (0, 1]", self.eval_fraction)
        if self.cross_tokenizer and (self.kl_reverse or self.kl_tail != "bucket"):
            raise ConfigError(
                "cross_tokenizer=true computes the forward KL over mapped buckets + a tail bucket: "
                f"kl_reverse must be false and kl_tail 'bucket' (got {self.kl_reverse}, {self.kl_tail!r})"
            )
        fraction(self, "warmup_ratio", "jsd_beta")
        for name in ("w_chunk_kl", "w_alm"):
            if getattr(self, name) and not self.cross_tokenizer:
                raise ConfigError(
                    f"{name}={getattr(self, name)} compares events across two tokenizers: it needs "
                    "cross_tokenizer=true (with one tokenizer, use w_kl)"
                )
        if self.teacher_head and self.cross_tokenizer:
            raise ConfigError(
                "teacher_head (the exact teacher from its hidden states) needs the teacher's vocabulary "
                "on the student side: it cannot be combined with cross_tokenizer=true"
            )
        if self.jsd_beta and (not self.teacher_head or self.kl_reverse):
            raise ConfigError(f"jsd_beta={self.jsd_beta} needs teacher_head (the exact teacher) and kl_reverse=false")


@dataclass(slots=True)
class DistillParams:
    """What `python -m stages.distill_student` (Stage 2) reads of params.yaml (data: only across tokenizers, where
    the student tokenizes the records itself)."""

    seed: int = 0
    """Seed of the student's and P's initial weights and of the batch order."""
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        check_fields(self)

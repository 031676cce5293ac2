"""The `prepare` section: the embedded default's synthetic task, tokenizer and tiny random-init models."""

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.base import PathStr, at_least, check_fields, require


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
        check_fields(self)
        at_least(self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        require(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"a multiple of num_heads={self.num_heads}",
            self.hidden_size,
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            "num_heads",
            f"a multiple of num_kv_heads={self.num_kv_heads}",
            self.num_heads,
        )


@dataclass(slots=True)
class PrepareConfig:
    """The embedded default: a synthetic task, a locally trained tokenizer and tiny random-init models."""

    out_data: PathStr = "artifacts/data/task.jsonl"
    """Where the synthetic instruction dataset is written (JSONL {"instruction", "input", "output"} records, the
    format data.path reads for real data too)."""
    out_models: PathStr = "artifacts/base"
    """Folder receiving `tokenizer/`, `teacher/` and `student/` (Hugging Face format, random weights)."""
    task: Literal["digit_sum", "split", "hmm"] = "split"
    """The synthetic task (pipeline/data/task.py): "digit_sum" (one right answer; the teacher is nearly one-hot) or
    "split" (N -> any "a + b" with a + b = N, many right answers; the teacher keeps spread soft targets) or "hmm" (the
    positive control: a stochastic language whose next-word distribution is known exactly, scored by KL(true || model);
    n_digits is not used)."""
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
        check_fields(self)
        at_least(self, 1, "n_examples", "n_digits", "tokenizer_vocab", "vocab_multiple", "other_tokenizer_vocab")
        require(
            self.task != "split" or self.n_digits >= 2, "n_digits", ">= 2 for the split task (N >= 10)", self.n_digits
        )


@dataclass(slots=True)
class PrepareParams:
    """What `python -m stages.prepare` reads of params.yaml."""

    seed: int = 0
    """Seed of the synthetic data, the tokenizers' corpus order and the random initial weights."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self):
        check_fields(self)

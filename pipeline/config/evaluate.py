"""The `evaluate` section: teacher and students compared on held-out data and on the validation cache."""

from dataclasses import dataclass, field

from pipeline.config.base import Bits, Dtype, PathStr, at_least, check_fields, require
from pipeline.config.data import DataConfig


@dataclass(slots=True)
class EvalConfig:
    """`python -m stages.evaluate`: teacher vs students on held-out data and on the validation cache."""

    models: dict[str, PathStr] = field(
        default_factory=lambda: {
            "teacher": "artifacts/teacher",
            "student_base": "artifacts/base/student",
            "student_ce": "artifacts/student_ce",
            "student_distilled": "artifacts/student",
            "student_x_ce": "artifacts/student_x_ce",
            "student_x": "artifacts/student_x",
        }
    )
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
        check_fields(self)
        require(bool(self.models), "models", "a non-empty mapping (name -> checkpoint)", self.models)
        at_least(self, 0, "eval_examples")
        at_least(self, 1, "max_new_tokens", "batch_size")


@dataclass(slots=True)
class EvalParams:
    """What `python -m stages.evaluate` reads of params.yaml."""

    seed: int = 0
    """Seed of the splits."""
    data: DataConfig = field(default_factory=DataConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_fields(self)

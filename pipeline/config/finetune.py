"""The `finetune` section: the teacher's supervised fine-tuning before it is cached."""

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.base import LoraSettings, PathStr, at_least, check_fields, fraction, positive
from pipeline.config.data import DataConfig


@dataclass(slots=True)
class FinetuneConfig:
    """Supervised fine-tuning of the teacher on the task, before it is cached: the students learn the task from the
    teacher's distributions, so the teacher must know it first."""

    base: PathStr = "artifacts/base/teacher"
    """Model to fine-tune: a local folder or a hub name."""
    out: PathStr = "artifacts/teacher"
    """Where the fine-tuned (and, for LoRA, merged) teacher is saved as a plain checkpoint."""
    metrics: PathStr = "artifacts/metrics/teacher.json"
    """Where the teacher's held-out accuracy is written (a DVC metric; outside `out`, DVC outputs can't nest)."""
    mode: Literal["lora", "full"] = "full"
    """"lora" (LoRA SFT then merge_and_unload: trains a large pretrained teacher in little memory, and the merged
    checkpoint is a plain model that Stage 1 loads without peft) or "full" (for the from-scratch tiny teacher)."""
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
        check_fields(self)
        positive(self, "epochs", "lr")
        at_least(self, 1, "batch_size")
        fraction(self, "warmup_ratio")
        at_least(self, 0, "eval_examples")


@dataclass(slots=True)
class FinetuneParams:
    """What `python -m stages.finetune_teacher` reads of params.yaml."""

    seed: int = 0
    """Seed of the splits and the training order."""
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        check_fields(self)

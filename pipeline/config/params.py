"""The whole of params.yaml as one dataclass, for what reads every section: the VRAM planner, the ablation, tests.

The dataclass defaults equal params.yaml (tests/test_config.py fails when they drift), so `Config()` is the
embedded default. Stages load only their own sections (pipeline/config/base.py `load_sections`)."""

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.base import check_fields, load_sections
from pipeline.config.cache import CacheConfig
from pipeline.config.data import DataConfig
from pipeline.config.distill import DistillConfig
from pipeline.config.evaluate import EvalConfig
from pipeline.config.finetune import FinetuneConfig
from pipeline.config.prepare import PrepareConfig


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
        check_fields(self)


def load_config(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    """Every section of params.yaml (missing ones take their defaults), with CLI overrides applied, validated."""
    return load_sections(Config, path, overrides)

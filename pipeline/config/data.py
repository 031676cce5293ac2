"""The `data` section: instruction records and how they become supervised token sequences (every stage but prepare)."""

from dataclasses import dataclass
from typing import Literal

from pipeline.config.base import PathStr, at_least, check_fields, fraction, require


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
    instruction's number: a task with many right answers, which equality with the one reference would mark wrong)
    or "embedded_task" (the synthetic tasks' rules)."""
    limit: int = 0
    """Use only the first `limit` records of the file (0 = all), like a train[:N] slice of a public dataset: a short
    run on a fixed subset (the qwen2.5-7b_to_1.5b preset takes alpaca-cleaned's first 3000); the splits inside them
    are still chosen by sample id."""

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "max_length")
        at_least(self, 0, "limit")
        fraction(self, "val_fraction", "test_fraction")
        require(
            self.val_fraction + self.test_fraction < 1,
            "val_fraction + test_fraction",
            "< 1 (no training examples would be left)",
            self.val_fraction + self.test_fraction,
        )

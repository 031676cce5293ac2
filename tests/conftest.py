"""Shared fixtures: the embedded default built once per session at test size, in a temp folder; float64 test
references used by several test files."""
import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import Config, ModelShape

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def small_config(tmp: Path) -> Config:
    """The embedded default shrunk so each stage takes seconds; every path points into `tmp`."""
    cfg = Config()
    cfg.prepare.out_data = str(tmp / "data/task.jsonl")
    cfg.prepare.out_models = str(tmp / "base")
    cfg.prepare.n_examples = 300
    # widths >= 64: bitsandbytes 4-bit blocks are 64 input features, narrower layers fail to quantise
    cfg.prepare.teacher = ModelShape(64, 2, 2, 1, 128)
    cfg.prepare.student = ModelShape(64, 1, 2, 1, 64)
    cfg.data.path = cfg.prepare.out_data
    cfg.finetune.base = str(tmp / "base/teacher")
    cfg.finetune.out = str(tmp / "teacher")
    cfg.finetune.metrics = str(tmp / "metrics/teacher.json")
    cfg.finetune.epochs = 1
    cfg.finetune.eval_examples = 16
    cfg.cache.teacher = str(tmp / "base/teacher")  # random teacher: caching does not need a trained one
    cfg.cache.out = str(tmp / "cache")
    cfg.cache.k = 8
    cfg.cache.batch_tokens = 1024
    cfg.cache.shard_rows = 256
    return cfg


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Config:
    """Prepared tiny data, tokenizer, teacher and student (built once); returns a config pointing at them."""
    from pipeline.data import prepare

    cfg = small_config(tmp_path_factory.mktemp("tiny"))
    prepare.run(cfg)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """Loss/Sinkhorn tensors are tiny: OpenMP fan-out only costs time, 2-3x more on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def padded_masks(B: int, N: int, M: int):
    """(B >= 3) masks: sequence 0 full, 1 right-padded on both sides, 2 left-padded on one side and right-padded
    on the other (needs N > 30, M > 20)."""
    a_mask = torch.ones(B, N, dtype=torch.bool)
    b_mask = torch.ones(B, M, dtype=torch.bool)
    a_mask[1, 30:] = False
    b_mask[1, 20:] = False
    a_mask[2, :5] = False
    b_mask[2, -3:] = False
    return a_mask, b_mask


def unrolled_log_plan(c: torch.Tensor, eps: float, n_iter: int) -> torch.Tensor:
    """Float64 reference: log of the entropic OT plan between uniform marginals for one unpadded cost (n, m),
    by plain log-domain Sinkhorn unrolled under autograd (so gradients flow through every iteration)."""
    n, m = c.shape
    u = torch.zeros(n, dtype=c.dtype)
    v = torch.zeros(m, dtype=c.dtype)
    for _ in range(n_iter):
        u = -math.log(n) - torch.logsumexp(v[None, :] - c / eps, dim=1)
        v = -math.log(m) - torch.logsumexp(u[:, None] - c / eps, dim=0)
    return u[:, None] + v[None, :] - c / eps  # (n, m)


def rel_err(x, ref) -> float:
    """Relative error of x against a float64 reference, in the 2-norm."""
    return ((x.double() - ref).norm() / ref.norm()).item()


class NewAllocations(TorchDispatchMode):
    """Shapes of every tensor an op allocates (outputs not sharing storage with an input: no views, no
    in-place results)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(o.shape))
        return out

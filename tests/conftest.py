"""Shared fixtures: the embedded default built once per session at test size, in a temp folder; float64 test
references used by several test files; the Stage-2 helpers. (The plain full-logits reference of the Stage-2 loss,
`reference_loss`, is in bench/reference.py, shared with the training-step benchmark.)"""

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cache import CacheWriter
from pipeline.config.params import Config
from pipeline.config.prepare import ModelShape

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first (their order otherwise kept): on the suite's two xdist workers (one file at a
    time each) the long end-to-end tests then start at once instead of forming the tail of the run."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def small_config(tmp: Path) -> Config:
    """The embedded default shrunk so each stage takes seconds; every path points into `tmp`."""
    cfg = Config()
    cfg.prepare.out_data = str(tmp / "data/task.jsonl")
    cfg.prepare.out_models = str(tmp / "base")
    cfg.prepare.task, cfg.prepare.n_digits, cfg.prepare.n_examples = "digit_sum", 6, 300
    # explicit test sizes for every default the tests run with: a params.yaml change must not slow them down
    # (or change them: 384 is below the ~389 tokens BPE reaches, so a smaller vocab is a genuinely other one)
    cfg.prepare.tokenizer_vocab = 384
    # widths >= 64: bitsandbytes 4-bit blocks are 64 input features, narrower layers fail to quantise
    cfg.prepare.teacher = ModelShape(64, 2, 2, 1, 128)
    cfg.prepare.student = ModelShape(64, 1, 2, 1, 64)
    cfg.data.path = cfg.prepare.out_data
    cfg.finetune.base = str(tmp / "base/teacher")
    cfg.finetune.out = str(tmp / "teacher")
    cfg.finetune.metrics = str(tmp / "metrics/teacher.json")
    cfg.finetune.epochs = 1
    cfg.finetune.batch_size = 32
    cfg.finetune.eval_examples = 16
    cfg.cache.teacher = str(tmp / "base/teacher")  # random teacher: caching does not need a trained one
    cfg.cache.out = str(tmp / "cache")
    cfg.cache.k = 8
    cfg.cache.batch_tokens = 1024
    cfg.cache.shard_rows = 256
    cfg.distill.epochs, cfg.distill.batch_size, cfg.distill.num_workers = 1.0, 32, 0
    cfg.evaluate.eval_examples, cfg.evaluate.batch_size, cfg.evaluate.max_new_tokens = 16, 32, 16
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
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(o.shape))
        return out


def stage(name: str, *args: str, check=True, **kw) -> subprocess.CompletedProcess:
    """Run `python -m stages.<name>` from the repo root, as DVC and users do."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args], cwd=ROOT, env=env, text=True, capture_output=True, **kw
    )
    if check and p.returncode != 0:
        raise AssertionError(f"stages.{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


# ---------------------------------------------------------------------------------------------------------
# Stage 2 helpers shared by test_distill, test_evaluate and test_presets
# ---------------------------------------------------------------------------------------------------------


def make_cache(tiny: Config, out: Path, teacher: str | None = None) -> Config:
    """Stage 1 (in process) into `out` with the tiny random teacher, or another `teacher`."""
    from pipeline.teacher import cache_teacher

    cfg = copy.deepcopy(tiny)
    cfg.cache.out = str(out)
    cfg.cache.teacher = teacher or tiny.cache.teacher
    cache_teacher.run(cfg)
    return cfg


def distill_cfg(cfg: Config, out: Path, **kw) -> Config:
    """A copy of cfg whose Stage 2 trains the tiny student briefly into `out` (curves next to it)."""
    cfg = copy.deepcopy(cfg)
    d = cfg.distill
    d.student = str(Path(cfg.prepare.out_models) / "student")
    d.cache, d.out, d.plots = cfg.cache.out, str(out), str(out.parent / "plots")
    d.batch_size, d.num_workers, d.logging_steps, d.max_steps, d.lr, d.warmup_ratio = 16, 0, 1, 8, 1e-2, 0.0
    for k, v in kw.items():
        setattr(d, k, v)
    return cfg


def read_tsv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ---------------------------------------------------------------------------------------------------------
# Cache-writer helpers shared by test_cache and the process it SIGKILLs mid-write
# ---------------------------------------------------------------------------------------------------------

K, D, SHARD = 5, 13, 16
PROV = {"teacher": "tiny-teacher", "teacher_hash": "a1b2", "tokenizer_hash": "t0", "params": {"k": K}}


def make_inputs(seed=0, lengths=(5, 9, 1, 12, 7, 20, 4)):
    """7 sequences of awkward lengths, incl. a 1-token one (no rows); last position never supervised."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 1000, n).astype(np.int64) for n in lengths]
    sup = [np.r_[rng.random(n - 1) < 0.7, False] for n in lengths]
    sids = [f"{int(x):016x}" for x in rng.integers(0, 2**63, len(lengths), dtype=np.int64)]
    return dict(sample_ids=sids, input_ids_per_seq=ids, supervised_per_seq=sup)


def row_targets(inputs) -> np.ndarray:
    """(R,) each row's target token: input_ids[j+1] at every supervised position j, sequence after sequence."""
    return np.concatenate(
        [x[np.flatnonzero(m) + 1] for x, m in zip(inputs["input_ids_per_seq"], inputs["supervised_per_seq"])]
    )


def make_rows(n_rows, seed=1):
    """(ids, lp, tail, hidden, observed) of the right shapes; values are random (no row contract)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(1000, generator=g)[:K] for _ in range(n_rows)])
    lp = torch.randn(n_rows, K, generator=g).sort(dim=1, descending=True).values - 2.0
    tail = torch.randn(n_rows, generator=g)
    hidden = torch.randn(n_rows, D, generator=g)
    observed = -torch.rand(n_rows, generator=g) * 10  # drawn last: the other arrays keep their values
    return ids, lp, tail, hidden, observed


def create(path, inputs=None, **kw):
    args = dict(k=K, logprob_dtype="bf16", hidden_size=D, hidden_codec="bf16", provenance=PROV, shard_rows=SHARD)
    args.update(kw)
    return CacheWriter.create_or_resume(path, **(inputs or make_inputs()), **args)


def write_all(w, rows, step=None):
    ids, lp, tail, hid, obs = rows
    n = len(ids)
    bounds = [0, n] if step is None else sorted(set([0, n] + list(step)))
    for a, b in zip(bounds[:-1], bounds[1:]):
        w.write_rows(a, ids[a:b], lp[a:b], tail[a:b], None if hid is None else hid[a:b], observed=obs[a:b])


def sh(*cmd: str, cwd: Path) -> str:
    # `python` in dvc.yaml must be this interpreter (the one with otkd installed)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(cwd),
    }
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def copy_project(dst: Path, keep=lambda f: f != "dvc.lock") -> Path:
    """The project's files (tracked or not, minus .gitignore'd ones) that `keep` accepts, copied to `dst`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True, capture_output=True, check=True
    ).stdout.split()
    for f in files:
        if keep(f) and (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            (dst / f).write_bytes((ROOT / f).read_bytes())
    return dst


def commit_all(repo: Path) -> None:
    """`repo` as a fresh git repository with everything in it committed (dvc exp and plots need git)."""
    sh("git", "init", "-q", cwd=repo)
    if not (repo / ".dvc").is_dir():
        sh("dvc", "init", "-q", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy", cwd=repo)


def ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}

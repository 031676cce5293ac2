"""Data-parallel Stage 1 (pipeline/teacher/parallel.py): real torchrun jobs on the CPU (gloo) write a store that is
byte-identical to a single process's for 1, 2 and 3 ranks; a job whose rank is SIGKILLed resumes at another world
size and ends byte-identical; shards are dealt out by cost; two writers of one store, each owning its shards, make
the single writer's store."""

import copy
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache import CacheWriter, open_cache
from pipeline.teacher import cache_teacher, parallel
from tests.conftest import ROOT, create, make_inputs, make_rows, stage, write_all
from tests.test_stage1 import params_file

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# small shards and batches: 28 shards, batches straddling shard boundaries; a low-rank codec, so that every rank must
# encode with rank 0's basis
COMMON = dict(shard_rows=64, batch_tokens=256, splits=["train"], hidden_codec="fisher:16", hidden_calibration_rows=300)


def torchrun(nproc: int, *target: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc <target>` from the repo root (its own free port per job)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    if kw.pop("background", False):
        return subprocess.Popen(
            cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
        )
    p = subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", ENV), capture_output=True, text=True, **kw)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def same_tree(a: Path, b: Path) -> list[str]:
    """Files that differ or exist on one side only (every byte compared)."""
    cmp = filecmp.dircmp(a, b)
    out = [f"{a.name}/{x}" for x in cmp.left_only + cmp.right_only + cmp.funny_files]
    out += [f"{a.name}/{x}" for x in cmp.common_files if not filecmp.cmp(a / x, b / x, shallow=False)]
    for d in cmp.common_dirs:
        out += same_tree(a / d, b / d)
    return out


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """The reference: today's single-process Stage 1 (python -m stages.cache_teacher)."""
    tmp = tmp_path_factory.mktemp("par1")
    stage("cache_teacher", "--params", params_file(tiny, tmp / "p.yaml", out=str(tmp / "cache"), **COMMON))
    return tmp / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_any_world_size_writes_the_single_process_store(tiny, single, tmp_path, world):
    out = tmp_path / "cache"
    p = torchrun(
        world, "-m", "stages.cache_teacher", "--params", params_file(tiny, tmp_path / "p.yaml", out=str(out), **COMMON)
    )
    log = p.stdout + p.stderr
    assert sum(f"rank {r}/{world}: " in log for r in range(world)) == world, log[-2000:]
    assert "imbalance (max/mean)" in log and log.count("basis fitted") == 1  # rank 0 fits, the others receive it
    assert same_tree(single / "train.zarr", out / "train.zarr") == []
    for f in ("teacher_embeddings.safetensors", "tokenizer/tokenizer.json"):
        assert filecmp.cmp(single / f, out / f, shallow=False), f


@pytest.mark.slow
def test_ranks_that_open_the_store_late_still_write_every_shard(tiny, single, tmp_path):
    """Rank 1 opens the store 3 s after rank 0 created it: the shards are dealt out from rank 0's reading of the
    records, before anyone writes (dealt out by each rank from its own late reading, rank 1 would see shards rank 0
    had finished meanwhile and leave one unwritten)."""
    out = tmp_path / "cache"
    params = params_file(tiny, tmp_path / "p.yaml", out=str(out), **COMMON)
    torchrun(2, str(ROOT / "tests/slow_stage1.py"), "0", "--params", params, env={**ENV, "SLOW_STAGE1_OPEN_DELAY": "3"})
    assert same_tree(single / "train.zarr", out / "train.zarr") == []


@pytest.mark.slow
def test_a_killed_rank_then_another_world_size_ends_identical(tiny, single, tmp_path):
    """SIGKILL one rank of a 2-rank job mid-run (torchrun stops the other): the store is incomplete, never read as
    complete; rerun with 3 ranks: they write only the missing shards, with the stored basis, and the store is
    byte-identical to the single process's."""
    params = params_file(tiny, tmp_path / "p.yaml", out=str(tmp_path / "cache"), **COMMON)
    job = torchrun(2, str(ROOT / "tests/slow_stage1.py"), "0.1", "--params", params, background=True)
    done = tmp_path / "cache/train.zarr/shard_done/c"
    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None and not (done.exists() and len(list(done.iterdir())) >= 4):
        time.sleep(0.02)
    assert job.poll() is None, "the job finished before it could be killed:\n" + job.stdout.read()[-2000:]
    workers = [int(p) for p in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0, out[-2000:]
    with pytest.raises(Exception, match="incomplete"):
        open_cache(tmp_path / "cache/train.zarr")
    n_done = len(list(done.iterdir()))
    assert 4 <= n_done < 28

    p = torchrun(3, "-m", "stages.cache_teacher", "--params", params)
    log = p.stdout + p.stderr
    assert "basis fitted" not in log  # the killed job's basis, read back from the store
    owned = [int(log.split(f"rank {r}/3: ")[1].split(" of ")[0]) for r in range(3)]
    assert sum(owned) == 28 - n_done  # only the shards without a record, each by one rank
    assert same_tree(single / "train.zarr", tmp_path / "cache/train.zarr") == []


def test_device_map_auto_writes_the_same_store(tiny, single, tmp_path):
    """cache.device_map=auto (a teacher spread over several GPUs) on the CPU: accelerate's dispatch, same store. It
    is not part of the provenance: a store written either way resumes the other way."""
    cfg = copy.deepcopy(tiny)
    for k, v in COMMON.items():
        setattr(cfg.cache, k, v)
    cfg.cache.out, cfg.cache.device_map = str(tmp_path / "cache"), "auto"
    cache_teacher.run(cfg)
    assert same_tree(single / "train.zarr", tmp_path / "cache/train.zarr") == []


def test_shards_are_dealt_out_by_cost():
    """Contiguous runs cut by cost: every todo shard exactly once, in order, each rank within one shard's cost of the
    mean although costs grow along the store (length-sorted sequences), where runs of equal shard counts are far
    off; the same answer every time; fewer shards than ranks leave ranks idle."""
    cost = np.arange(1, 201) ** 2  # growing, like shards of length-sorted sequences
    todo = np.flatnonzero(np.arange(200) % 7 != 3)  # some shards already done
    owned = parallel.assign_shards(cost, todo, 3)
    assert [s for o in owned for s in o] == list(todo)  # contiguous runs, in order
    load = np.array([int(cost[o].sum()) for o in owned])
    assert np.abs(load - load.mean()).max() <= cost[todo].max()
    assert load.max() / load.mean() < 1.02
    equal_counts = [int(cost[c].sum()) for c in np.array_split(todo, 3)]
    assert max(equal_counts) / (sum(equal_counts) / 3) > 1.5
    assert parallel.assign_shards(cost, todo, 3) == owned
    assert parallel.assign_shards(cost, todo, 1) == [list(todo)]
    assert parallel.assign_shards(cost, np.array([5, 9]), 3) in ([[5], [9], []], [[5], [], [9]], [[], [5], [9]])


def test_shard_costs_count_straddling_batches_for_both_shards():
    # rows [0, 10) [10, 25) [25, 25) [25, 40) with 16-row shards: shard 0 <- b0 b1, shard 1 <- b1 b3, shard 2 <- b3
    cost = parallel.shard_costs([(0, 10), (10, 25), (25, 25), (25, 40)], [1, 10, 100, 1000], 16, 3)
    assert cost.tolist() == [11, 1010, 1000]


def test_two_writers_owning_disjoint_shards_make_the_single_writers_store(tmp_path):
    """The writer side in one process: rank 0 creates, a second writer opens the store; each is fed every row (as
    each rank runs every batch that touches its shards) but keeps only its own; neither close marks the store
    complete, `finish` after both does; the arrays equal a single writer's."""
    inputs = make_inputs()
    rows = make_rows(int(sum(m.sum() for m in inputs["supervised_per_seq"])))
    one = create(tmp_path / "one.zarr", inputs)
    write_all(one, rows)
    assert one.close()

    w0 = create(tmp_path / "two.zarr", inputs)
    w1 = CacheWriter.open(tmp_path / "two.zarr")
    n = w0.n_shards
    assert n >= 3
    w0.own(range(0, n, 2))
    w1.own(range(1, n, 2))
    for w in (w0, w1):
        write_all(w, rows, step=range(0, len(rows[0]), 5))
        assert not w.close(mark_complete=False)
    assert not zarr.open_group(tmp_path / "two.zarr", mode="r").attrs["complete"]
    assert w0.finish()
    open_cache(tmp_path / "two.zarr")  # complete, every shard's files as its manifest says
    a, b = (zarr.open_group(tmp_path / f"{x}.zarr", mode="r") for x in ("one", "two"))
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "hidden", "shard_done"):
        assert np.array_equal(a[name][...], b[name][...]), name

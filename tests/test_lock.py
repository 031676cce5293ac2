"""One Stage-1 run per store (cache/lock.py): the lease refuses a second run while the first is alive, is free
again once its holder dies (SIGKILL included), is shared by the ranks of one job, and keeps two real Stage-1
processes on one output from racing."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache import CacheError, OtkdError
from cache.errors import CacheLockedError
from cache.lock import lock_path, read_holder, store_lease
from tests.conftest import ROOT, stage
from tests.test_stage1 import ARRAYS, params_file

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# a process that takes the lease of argv[1] as run argv[2], says so, and holds it until killed
HOLDER = """import sys, time
from cache.lock import store_lease
lease = store_lease(sys.argv[1], run_id=sys.argv[2], rank=0).acquire()
print("held", flush=True)
time.sleep(120)
"""


def wait_for(cond, what: str, timeout: float = 60.0, proc=None):
    deadline = time.time() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"process exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lease of tmp_path/s.zarr as run "r1"; yields (store, process)."""
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store), "r1"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield store, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_run_is_refused_naming_the_holder(holder):
    store, proc = holder
    h = read_holder(store)
    assert h["pid"] == proc.pid and h["run_id"] == "r1" and h["host"] and h["started"]
    with pytest.raises(CacheLockedError) as e, store_lease(store):
        pass
    msg = str(e.value)
    assert isinstance(e.value, CacheError) and isinstance(e.value, OtkdError)
    assert f"pid {proc.pid} on host {h['host']} since {h['started']}, run r1" in msg and str(store) in msg
    assert "\n" not in msg and "wait for it to finish or stop it" in msg
    assert read_holder(store)["pid"] == proc.pid  # a refused run leaves the holder's record alone


def test_sigkilled_holder_leaves_no_stuck_lease(holder):
    store, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_holder(store)["pid"] == proc.pid  # the dead run's record is still there ...
    with store_lease(store, run_id="r2") as lease:  # ... but the kernel dropped its lock
        assert lease.held and (read_holder(store)["pid"], read_holder(store)["run_id"]) == (os.getpid(), "r2")
    assert lock_path(store).exists() and lock_path(store).stat().st_size == 0  # emptied, never unlinked


def test_release_empties_the_file_and_frees_the_lease(tmp_path):
    store = tmp_path / "out/s.zarr"  # the parent folder does not exist yet
    assert lock_path(store) == tmp_path / "out/s.zarr.lock"
    with store_lease(store, run_id="a") as lease:
        assert read_holder(store)["run_id"] == "a"
        with pytest.raises(CacheLockedError, match=f"pid {os.getpid()} "):  # also refused in the same process
            store_lease(store, run_id="b").acquire()
    assert not lease.held and lock_path(store).read_bytes() == b""
    with store_lease(store, run_id="b"):  # free again
        assert read_holder(store)["run_id"] == "b"
    assert lock_path(store).read_bytes() == b""


def test_an_exception_inside_releases(tmp_path):
    store = tmp_path / "s.zarr"
    with pytest.raises(KeyError), store_lease(store):
        raise KeyError("boom")
    assert lock_path(store).read_bytes() == b""
    store_lease(store).acquire().release()


def test_ranks_of_the_holding_run_pass_others_are_refused(holder, monkeypatch):
    store, proc = holder
    with store_lease(store, run_id="r1", rank=1) as lease:  # rank > 0 of the holder's job: passes, takes nothing
        assert not lease.held
    with pytest.raises(CacheLockedError, match=f"pid {proc.pid} .*run r1.*not by rank 0 of this run \\(r2\\)"):
        store_lease(store, run_id="r2", rank=1).acquire()
    # the defaults come from torchrun's environment
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")
    monkeypatch.setenv("RANK", "3")
    with store_lease(store) as lease:
        assert (lease.run_id, lease.rank, lease.held) == ("r1", 3, False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CacheLockedError, match=f"pid {proc.pid} "):  # rank 0 of the same job id: a second holder
        store_lease(store).acquire()
    assert read_holder(store)["pid"] == proc.pid


def test_a_rank_on_another_host_checks_the_holders_run_id(tmp_path, monkeypatch):
    """Multi-node: rank 0's flock may be invisible from another host (NFS with local_lock=flock), so a rank there
    trusts the holder's JSON when it names its own job, and is refused when it names another."""
    store = tmp_path / "s.zarr"
    lease = store_lease(store, run_id="job1", rank=0).acquire()
    try:
        monkeypatch.setattr("socket.gethostname", lambda: "node-7")  # this rank runs on another host ...
        monkeypatch.setattr("cache.lock.fcntl.flock", lambda fd, op: None)  # ... where rank 0's flock is invisible
        with store_lease(store, run_id="job1", rank=9) as other:
            assert not other.held
        with pytest.raises(CacheLockedError, match="run job1.*not by rank 0 of this run \\(job2\\)"):
            store_lease(store, run_id="job2", rank=9).acquire()
    finally:
        lease.release()


def test_rank_without_a_lease_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    with pytest.raises(CacheLockedError, match="no lease"):  # no lock file yet
        store_lease(store, run_id="r1", rank=1).acquire()
    store_lease(store, run_id="r1").acquire().release()
    with pytest.raises(CacheLockedError, match="rank 0 must take it first"):  # file there, nobody holds it
        store_lease(store, run_id="r1", rank=1).acquire()
    with store_lease(store, run_id="r1"):  # the probe left no lock behind
        pass


def test_default_run_ids(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    a, b = store_lease("x.zarr"), store_lease("x.zarr")
    assert a.rank == 0 and a.run_id != b.run_id  # outside torchrun every run is its own job
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default without --rdzv-id
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert store_lease("x.zarr").run_id == "none@127.0.0.1:29500"


def test_hard_linked_lock_file_is_not_written_through(tmp_path):
    """A DVC checkout with cache.type hardlink/symlink makes the lock file a link into DVC's cache."""
    store, other = tmp_path / "s.zarr", tmp_path / "dvc-cache-object"
    other.write_bytes(b"")
    os.link(other, lock_path(store))
    with store_lease(store, run_id="h"):
        assert read_holder(store)["run_id"] == "h"
    assert other.read_bytes() == b"" and lock_path(store).stat().st_nlink == 1
    lock_path(store).unlink()
    os.symlink(other, lock_path(store))
    with store_lease(store, run_id="s"):
        assert read_holder(store)["run_id"] == "s"
    assert other.read_bytes() == b"" and not lock_path(store).is_symlink()


# ---------------------------------------------------------------------------------------------------------
# real Stage-1 processes
# ---------------------------------------------------------------------------------------------------------

COMMON = dict(shard_rows=64, batch_tokens=256, splits=["train"])


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """A clean, uninterrupted single Stage-1 run: what every store below must equal bit for bit."""
    tmp = tmp_path_factory.mktemp("lock_ref")
    stage("cache_teacher", "--params", params_file(tiny, tmp / "p.yaml", out=str(tmp / "ref"), **COMMON))
    return tmp / "ref/train.zarr"


def assert_same_store(ref: Path, got: Path):
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(got), mode="r")
    for name in ARRAYS:
        assert np.array_equal(a[name][...], b[name][...]), name
    assert b.attrs["complete"] is True
    assert lock_path(got).read_bytes() == b""  # released: the output folder hashes the same as after any run


def slow_stage1(params: str, delay: str, log: Path) -> subprocess.Popen:
    """Stage 1 pausing `delay` s per batch (tests/slow_stage1.py); stderr (tqdm included) to `log`, not a pipe
    nobody drains."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "tests/slow_stage1.py"), delay, "--params", params],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )


def shards_done(store: Path) -> int:
    d = store / "shard_done"
    return sum(1 for p in d.rglob("*") if p.is_file() and p.name != "zarr.json") if d.exists() else 0


def test_concurrent_stage1_runs_on_one_store(tiny, reference, tmp_path):
    """A second Stage-1 process on a store that a first one is writing exits with one error line naming the
    holder and touches nothing; the first finishes into a store equal to a clean run."""
    params = params_file(tiny, tmp_path / "p.yaml", out=str(tmp_path / "cache"), **COMMON)
    store = tmp_path / "cache/train.zarr"
    first = slow_stage1(params, "0.05", tmp_path / "first.log")
    try:
        wait_for(lambda: read_holder(store) is not None, "the first run's lease", proc=first)
        assert read_holder(store)["pid"] == first.pid
        wait_for(lambda: shards_done(store) >= 2, "two finished shards", proc=first)
        # freeze the holder mid-run, lease held: the second run meets it however long its own start-up takes
        first.send_signal(signal.SIGSTOP)
        second = stage("cache_teacher", "--params", params, check=False)
        done_before = shards_done(store)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0
    errors = [x for x in second.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"{store} is being written by another Stage-1 run (pid {first.pid} on host" in errors[0]
    assert "batches to run" not in second.stdout  # refused before reading the shard records
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert 2 <= done_before < shards_done(store)  # the first run went on writing after the refusal
    assert_same_store(reference, store)


def test_sigkilled_holder_then_new_run_takes_over(tiny, reference, tmp_path):
    """SIGKILL the Stage-1 run holding the lease mid-run: the next run takes the lease at once (no stale lock),
    resumes, and ends bit-identical to a clean run."""
    params = params_file(tiny, tmp_path / "p.yaml", out=str(tmp_path / "cache"), **COMMON)
    store = tmp_path / "cache/train.zarr"
    first = slow_stage1(params, "0.05", tmp_path / "first.log")
    try:
        wait_for(lambda: shards_done(store) >= 2, "two finished shards", proc=first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert read_holder(store)["pid"] == first.pid  # the dead run's record stays, its lock does not
    p = stage("cache_teacher", "--params", params)
    todo, total = map(int, re.search(r"(\d+)/(\d+) batches to run", p.stdout).groups())
    assert 0 < todo < total  # resumed after the killed run's finished shards
    assert_same_store(reference, store)

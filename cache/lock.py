"""One Stage-1 run per store: a lease on a cache store that a second run cannot take while the first is alive.

Why: the writer's crash safety (cache/writer.py) assumes one writer. A second run started on the same store
snapshots `shard_done` when it opens the store and rewrites shards the first run finishes meanwhile; killed
in that window, the two left a store whose shard read as zeros. So a writer first takes the store's lease:

    with store_lease("artifacts/cache/train.zarr"):
        writer = CacheWriter.create_or_resume(...)   # reads the shard records only under the lease
        ...                                          # write, close
    # released: the next run may take it

How: an OS advisory lock, `flock(LOCK_EX | LOCK_NB)`, on the sibling file `<store>.lock` (the store itself is
created by a rename and may be deleted by --replace-mismatched, so it cannot carry the lock).

- Crashes: the kernel drops a flock when the last descriptor of its open file goes away, i.e. when the
  holder's process dies, SIGKILL and OOM kill included. A crashed run therefore never leaves a stuck lease and
  nothing needs stale-lease detection. The descriptor is close-on-exec, so a program the holder execs does not
  keep the lease; a child it *forks* (without exec) shares it until that child exits too.
- Naming the holder: after taking the lock the holder writes `{pid, host, started, run_id}` as JSON into the
  file (truncate + write), so a refused run says who to wait for. Release truncates it to empty and never
  unlinks it: a process may have the file open and be about to lock it, and after an unlink + re-create it
  would lock the old inode while a third process locks the new one (two holders). An empty file also keeps the
  content hash of a DVC output folder the same from run to run. After a crash the file still holds the dead
  run's JSON; the next holder overwrites it, and a refused run ignores a holder on this host whose pid is gone.
- The path must name the inode that is locked: after locking, the holder checks that `<store>.lock` still is
  the file it opened (else retries). A lock file that is a symlink or has other hard links (a DVC
  checkout with `cache.type` symlink/hardlink makes it one into DVC's cache) is first replaced by a fresh
  file, so the holder's JSON never lands in someone else's file.
- Ranks of one job (multi-rank Stage 1 is a later issue): all ranks of one `torchrun` job share `run_id`
  (env TORCHELASTIC_RUN_ID, which torchrun sets to the same value for every rank; a fresh uuid outside
  torchrun) and know their rank (env RANK, 0 by default). Rank 0 takes the flock and holds it for the job. A
  rank > 0 takes nothing: it checks that the lease is held (its own non-blocking shared flock attempt fails)
  and that the holder's `run_id` is its own, else it raises CacheLockedError. Multi-rank Stage 1 must
  therefore make ranks > 0 wait until rank 0 holds the lease (e.g. rank 0 enters `store_lease`, then a
  barrier) before they enter theirs, and keep rank 0's lease until every rank has finished writing (a barrier
  before rank 0 leaves it). torchrun's non-standalone default run id is the literal "none" for every job;
  then MASTER_ADDR:MASTER_PORT (unique among live jobs on one host) is appended so two jobs still differ.

Limit: flock is per host and only reliable on a local filesystem. On NFS (Linux emulates flock with POSIX byte
range locks there, depending on client and server) two runs on two hosts may both get it, and on object storage
there are no locks at all. Ranks of a multi-node job on other hosts than
rank 0 check the holder's JSON (its run id) instead of the flock, which they may not see.

Only the standard library: the cache package never imports pipeline or stages.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
import warnings
from datetime import datetime
from pathlib import Path

from cache.errors import CacheLockedError

# How long a refused run waits for the holder's JSON (it is written right after the lock is taken).
_HOLDER_WAIT_S = 1.0
_POLL_S = 0.05


def lock_path(store) -> Path:
    """The lock file of a store: `<store>.lock` next to it (artifacts/cache/train.zarr -> train.zarr.lock)."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


def default_run_id() -> str:
    """The job's id, the same in every rank of one torchrun job; a fresh one outside torchrun."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    if not rid:
        return uuid.uuid4().hex
    if rid == "none" and os.environ.get("MASTER_PORT"):  # torchrun without --rdzv-id: not unique per job
        return f"none@{os.environ.get('MASTER_ADDR', '')}:{os.environ['MASTER_PORT']}"
    return rid


def default_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def read_holder(store) -> dict | None:
    """The JSON the current (or last crashed) holder wrote into the lock file; None if empty or unreadable."""
    try:
        text = lock_path(store).read_bytes()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):  # no file, or a holder mid-write
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    """False only when the holder is known dead: same host and no such process (its JSON is left from a crash)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "holder unknown"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}, "
        f"run {holder.get('run_id')}"
    )


class StoreLease:
    """The lease of one store for one run (rank 0) or the check that its job holds it (rank > 0).

    Use `store_lease(...)` as a context manager; `acquire()` / `release()` are the same steps by hand.
    """

    def __init__(self, store, run_id: str | None = None, rank: int | None = None):
        self.store = Path(store)
        self.path = lock_path(store)
        self.run_id = str(run_id) if run_id is not None else default_run_id()
        self.rank = int(rank) if rank is not None else default_rank()
        self._fd = None

    @property
    def held(self) -> bool:
        """True while this object holds the flock (rank 0 between acquire and release)."""
        return self._fd is not None

    # ------------------------------------------------------------------ rank 0
    def acquire(self) -> "StoreLease":
        """Take the lease (rank 0) or check that this job's rank 0 holds it (rank > 0); CacheLockedError if not."""
        if self.rank > 0:
            self._check_joined()
            return self
        if self._fd is not None:
            raise RuntimeError(f"lease on {self.store} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            fd = self._open_own_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.store)
                holder = holder if holder is not None and _alive(holder) else None
                # the holder may not have written its JSON yet (or the file still names a crashed run):
                # look again briefly so the message can name who to wait for
                if holder is not None or time.monotonic() >= deadline:
                    raise CacheLockedError(
                        f"teacher cache {self.store} is being written by another Stage-1 run ({_describe(holder)}); "
                        f"wait for it to finish or stop it"
                    ) from None
                time.sleep(_POLL_S)
                continue
            except BaseException:
                os.close(fd)
                raise
            if not self._names(fd):  # replaced or removed between open and lock: lock what the path names now
                os.close(fd)
                continue
            break
        self._fd = fd
        try:
            data = json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                    "run_id": self.run_id,
                }
            ).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (rank 0); nothing for rank > 0. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # while still locked: no other run can have written into it yet
        finally:
            os.close(fd)  # drops the flock

    def _open_own_file(self) -> int:
        """A read-write descriptor of `<store>.lock` that is a plain file with no other hard links."""
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:  # ELOOP: a symlink
                    raise
                self._replace_with_empty_file()
                continue
            if os.fstat(fd).st_nlink <= 1:
                return fd
            os.close(fd)  # a hard link into another file (e.g. DVC's cache): never write into it
            self._replace_with_empty_file()
        raise CacheLockedError(f"cannot make {self.path} a plain lock file (it keeps being replaced)")

    def _replace_with_empty_file(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(b"")
        os.replace(tmp, self.path)  # atomic; whoever locked the old inode fails its _names check and retries

    def _names(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    # ------------------------------------------------------------------ rank > 0
    def _check_joined(self) -> None:
        """Rank > 0: the lease must be held (a shared non-blocking flock fails) by rank 0 of this very job. A rank
        on another host than rank 0 (a multi-node job on a shared filesystem) cannot see rank 0's flock on every
        filesystem (NFS mounted with local_lock=flock keeps it per host): there the holder's JSON, written under
        the lock and naming this job's run id, is the check."""
        holder = read_holder(self.store)
        if holder is not None and holder.get("host") != socket.gethostname():
            if holder.get("run_id") != self.run_id:
                raise CacheLockedError(
                    f"teacher cache {self.store} is being written by another Stage-1 run ({_describe(holder)}), not "
                    f"by rank 0 of this run ({self.run_id}); wait for it to finish or stop it"
                )
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            held = False
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                held = False
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if not held:
            raise CacheLockedError(
                f"teacher cache {self.store}: rank {self.rank} of run {self.run_id} found no lease on it; rank 0 "
                f"must take it first (multi-rank Stage 1 waits for rank 0 before the other ranks check)"
            )
        holder = read_holder(self.store)
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while (holder is None or not _alive(holder)) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            holder = read_holder(self.store)
        if holder is not None and not _alive(holder):
            holder = None
        if holder is None or holder.get("run_id") != self.run_id:
            raise CacheLockedError(
                f"teacher cache {self.store} is being written by another Stage-1 run ({_describe(holder)}), not by "
                f"rank 0 of this run ({self.run_id}); wait for it to finish or stop it"
            )

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "StoreLease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        return False


def store_lease(store, run_id: str | None = None, rank: int | None = None):
    """Context manager: hold the lease of `store` (rank 0) or check that this job holds it (rank > 0).

    `run_id` defaults to the job's id (TORCHELASTIC_RUN_ID, else a fresh uuid), `rank` to env RANK (else 0).
    Raises CacheLockedError, naming the holder, when another run holds it. A store on an fsspec URL (object
    storage) has no locks: nothing is taken, and a warning says that one Stage-1 job per store is the user's to keep.
    """
    if "://" in str(store):
        if (rank if rank is not None else default_rank()) == 0:
            warnings.warn(
                f"teacher cache {store}: object storage has no locks, so nothing stops a second Stage-1 run "
                "on this store; run one job per store at a time",
                stacklevel=2,
            )
        return contextlib.nullcontext()
    return StoreLease(store, run_id, rank)

"""Crash-safe, resumable writer of a teacher cache (layout and row contract: cache/schema.py).

Why it is shaped this way (measured with zarr-python 3.1: two processes writing disjoint, chunk-aligned
regions of the same shards lost 2-21% of the rows, zarr-python#3682): a partial write into a Zarr shard is a
read-modify-write of the whole shard object, so rows are buffered and each shard is written by exactly one
call; a shard's `shard_done` record is written only after all its row arrays, and the root `complete`
attribute only after every record. LocalStore writes are atomic (temp file + rename), so after a SIGKILL
every object on disk is either old or new; a rerun rewrites every shard without a record, from scratch, and
ends bit-identical to an uninterrupted run. The store is created in a sibling `<name>.creating` directory
and renamed into place, so a half-created store is never mistaken for a cache. On object storage (an fsspec URL,
cache/location.py) every object is one PUT, whole or absent, as atomic as the rename; there is no directory rename,
so a remote store is created in place with its base manifest last and a half-created one is repaired on resume.
Data-parallel Stage 1 gives each shard one writer (`own`, pipeline/teacher/parallel.py).

Integrity (cache/manifest.py): creation records every file it wrote in `manifest/base`; each shard's files
are recorded (path, size, CRC-32) in `manifest/<s>` after its data and before its `shard_done` record. On
resume a shard whose record exists but whose files fail the stat check against its manifest (deleted,
truncated) is not done: its record is dropped and it is rewritten; damaged per-sequence data is rewritten
from the inputs. Every chunk is written even when it equals the fill value, so every listed file exists.

With background=True (the default) a full shard is compressed and written by one helper thread while the
caller goes on (in Stage 1: while the GPU runs the next forward); at most one shard is in flight, so memory
is two shard buffers. Blosc and file I/O release the GIL, so the write overlaps the teacher almost fully.
"""

import os
import re
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from cache import codecs, location, manifest
from cache.errors import CacheMismatchError
from cache.location import is_url, join
from cache.schema import (
    BASIS_ARRAYS,
    FORMAT,
    LOGPROB_DTYPES,
    ROW_ARRAYS,
    ROW_CONTRACT,
    SCHEMA_VERSION,
    array_specs,
    canonical,
    canonical_meta,
    encode_float,
    first_difference,
    has_observed,
    hidden_codec,
    make_plan,
    n_shards,
    read_basis,
    read_root_attrs,
    short_repr,
    sid_to_u64,
    to_numpy,
)

# LocalStore's temp files: "<key>.<32 hex>.partial"; a SIGKILL mid-write leaves one behind.
_TMP_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")


# Provenance keys compared first when an existing store differs from what is asked for.
IDENTITY = ("teacher", "teacher_hash", "tokenizer_hash", "dataset_fingerprint")


class CacheWriter:
    """Writes rows in increasing, contiguous order; flushes one whole shard per Zarr write."""

    def __init__(self, path: Path, group, resumed: bool, background: bool = True):
        self.path, self._group, self.resumed = path, group, resumed
        a = group.attrs.asdict()
        self.k, self.n_rows, self.shard_rows = a["k"], a["n_rows"], a["shard_rows"]
        self.logprob_dtype, self.hidden_codec = a["logprob_dtype"], a["hidden_codec"]
        self.hidden_size = a["hidden_size"]
        self._attrs = a
        # every chunk written, even one equal to the fill value: the manifest lists every shard file
        self._arrays = {n: group[n].with_config({"write_empty_chunks": True}) for n in ROW_ARRAYS if n in group}
        self._basis = read_basis(group, a)  # low-rank codecs: rows are encoded with the basis the store holds
        self.manifest_seconds = 0.0  # time spent reading back and hashing written shards (bench)
        self._done_arr = group["shard_done"]
        self._done = self._done_arr[:].astype(bool)
        self._skip = self._done.copy()  # shards whose rows write_rows drops: done, or another rank's (own())
        self._skip_others = False  # own() was called: other writers write some shards
        self.complete = bool(a.get("complete")) and bool(self._done.all())
        self._buf = None  # {name: preallocated (shard_rows, ...) array}, allocated on first use
        self._buf_shard, self._buf_fill = None, 0
        self._spare = None  # the other shard buffer (background mode)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="otkd-cache-write") if background else None
        self._pending = None  # Future of the shard being written in the background
        self._closed = False

    # ---------------------------------------------------------------- creation / resume
    @classmethod
    def create_or_resume(
        cls,
        path,
        *,
        sample_ids,
        input_ids_per_seq,
        supervised_per_seq,
        k: int,
        logprob_dtype: str = "bf16",
        hidden_size: int | None = None,
        hidden_codec: str | None = None,
        hidden_basis: codecs.Basis | None = None,
        provenance: dict,
        shard_rows: int = 65536,
        background: bool = True,
    ):
        """Create the store (all per-sequence and token arrays written now) or resume a matching one.

        hidden_codec (cache/codecs.py) with hidden_size: how write_rows' hidden states are stored; a low-rank
        codec needs its `hidden_basis`, which is written with the store (and must be the same on resume).

        Raises CacheMismatchError naming the first differing field when `path` holds a cache made from other
        inputs, and CacheError when it holds something that is not an otkd cache.
        """
        path = location.loc(path)
        hidden_codec = None if hidden_codec in (None, "none") else hidden_codec
        base, plan = validated_inputs(
            sample_ids,
            input_ids_per_seq,
            supervised_per_seq,
            k=k,
            logprob_dtype=logprob_dtype,
            hidden_size=hidden_size,
            hidden_codec=hidden_codec,
            hidden_basis=hidden_basis,
            shard_rows=shard_rows,
        )
        want = {"schema_version": SCHEMA_VERSION, "plan": plan, "provenance": canonical(provenance)}
        if location.exists(path):
            check_matches(path, want)
            if not is_url(path):
                _remove_stale_temp_files(path)
            _repair_on_resume(path, base)
            return cls(path, zarr.open_group(path, mode="r+"), resumed=True, background=background)
        create_store(path, base, plan, want["provenance"])
        return cls(path, zarr.open_group(path, mode="r+"), resumed=False, background=background)

    @classmethod
    def open(cls, path, background: bool = True) -> "CacheWriter":
        """Open a store that `create_or_resume` has just created or repaired, to write some of its shards: the other
        ranks of a data-parallel Stage 1 (rank 0 creates; each rank then writes only the shards it `own`s)."""
        path = location.loc(path)
        return cls(path, zarr.open_group(path, mode="r+"), resumed=True, background=background)

    def own(self, shards) -> None:
        """Write only these shards (data-parallel Stage 1: each shard has exactly one writer); rows of every other
        shard are dropped like rows of a completed one. A shard's rows must still arrive contiguously."""
        owned = np.zeros(len(self._done), dtype=bool)
        owned[np.asarray(list(shards), dtype=np.int64)] = True
        self._skip = self._done | ~owned
        self._skip_others = True

    # ---------------------------------------------------------------- progress
    @property
    def n_shards(self) -> int:
        return len(self._done)

    @property
    def done(self) -> np.ndarray:
        """(n_shards,) bool: which shards have their record (as this writer last read or wrote them)."""
        return self._done.copy()

    @property
    def shards_done(self) -> int:
        return int(self._done.sum())

    def rows_todo(self) -> int:
        """First row of the first incomplete shard (n_rows if all are done): where a resumed run restarts."""
        todo = np.flatnonzero(~self._done)
        return int(todo[0]) * self.shard_rows if len(todo) else self.n_rows

    def is_row_range_done(self, start: int, end: int) -> bool:
        """True iff no row in [start, end) is for this writer to write: each lies in a completed shard, or in
        another rank's (so a batch producing them can be skipped)."""
        if end <= start:
            return True
        return bool(self._skip[int(start) // self.shard_rows : (int(end) - 1) // self.shard_rows + 1].all())

    # ---------------------------------------------------------------- writing
    def write_rows(self, row_start: int, topk_ids, topk_logprobs, tail, hidden=None, observed=None) -> None:
        """Append rows [row_start, row_start + n); tensors (any device, bf16 included) or arrays.

        topk_ids, topk_logprobs (n, k), tail (n,), hidden (n, D) when the store keeps hidden states, observed (n,):
        the teacher's log-prob of each row's target token (`observed_logprob`; required, the store is schema 4).

        Rows in completed shards are dropped silently (a resumed batch plan replays whole batches); inside an
        incomplete shard rows must arrive contiguously from the shard's first row.
        """
        row_start = int(row_start)
        if self._pending is not None and self._pending.done():
            self._wait()  # surface a failed background write now, not at close
        ids = to_numpy(topk_ids)
        n = ids.shape[0]
        if ids.shape != (n, self.k):
            raise ValueError(f"topk_ids has shape {ids.shape}, expected ({n}, {self.k})")
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError("topk_ids out of int32 range")
        cols = {
            "topk_ids": ids.astype(np.int32, copy=False),
            "topk_logprobs": encode_float(topk_logprobs, self.logprob_dtype),
            "tail_logmass": encode_float(tail, "fp32"),
        }
        if "observed_logprob" in self._arrays:
            if observed is None:
                raise ValueError(
                    "this cache stores observed_logprob: pass observed=(n,), the teacher's log-prob of each row's "
                    "target token (pipeline/teacher/topk.py, targets=)"
                )
            cols["observed_logprob"] = encode_float(observed, "fp32")
        if "hidden" in self._arrays:
            if hidden is None:
                raise ValueError("this cache stores hidden states: pass hidden=(n, D)")
            if tuple(hidden.shape) != (n, self.hidden_size):
                raise ValueError(f"hidden has shape {tuple(hidden.shape)}, expected ({n}, {self.hidden_size})")
            cols.update(codecs.encode(hidden, self.hidden_codec, self._basis))
        want = {
            "topk_ids": (n, self.k),
            "topk_logprobs": (n, self.k),
            "tail_logmass": (n,),
            "observed_logprob": (n,),
            "hidden": (n, self._arrays["hidden"].shape[1]) if "hidden" in self._arrays else None,
            "hidden_scale": (n,),
        }
        for name, a in cols.items():
            if a.shape != want[name]:
                raise ValueError(f"{name} has shape {a.shape}, expected {want[name]}")
        # NaN in what the losses read would poison training silently; hidden is left unchecked (cost ~D/k)
        lp = cols["topk_logprobs"]
        lp_nan = ((lp & 0x7FFF) > 0x7F80).any() if self.logprob_dtype == "bf16" else np.isnan(lp).any()
        obs_nan = "observed_logprob" in cols and np.isnan(cols["observed_logprob"]).any()
        if lp_nan or np.isnan(cols["tail_logmass"]).any() or obs_nan:
            raise ValueError(f"NaN in teacher log-probs, tail or observed log-prob, rows {row_start}..{row_start + n}")
        if row_start < 0 or row_start + n > self.n_rows:
            raise ValueError(f"rows {row_start}..{row_start + n} outside the cache's {self.n_rows} rows")

        pos, end = row_start, row_start + n
        while pos < end:
            s = pos // self.shard_rows
            s0, s1 = s * self.shard_rows, min((s + 1) * self.shard_rows, self.n_rows)
            take = min(end, s1) - pos
            if not self._skip[s]:
                if self._buf_shard != s:
                    if self._buf_shard is not None and self._buf_fill:
                        raise ValueError(
                            f"rows jump to shard {s} while shard {self._buf_shard} has only "
                            f"{self._buf_fill} rows buffered"
                        )
                    if pos != s0:
                        raise ValueError(
                            f"write_rows starts at row {pos}, inside incomplete shard {s}; a "
                            f"resumed run must restart at row {s0} (see writer.rows_todo())"
                        )
                    self._buf_shard, self._buf_fill = s, 0
                if pos != s0 + self._buf_fill:
                    raise ValueError(f"rows must be contiguous: got row {pos}, expected {s0 + self._buf_fill}")
                if self._buf is None:
                    # one shard of each array, reused (two in background mode; 470 MB each for hidden at
                    # 65,536 rows x 3584 bf16)
                    size = min(self.shard_rows, self.n_rows)
                    self._buf = {k: np.empty((size,) + a.shape[1:], a.dtype) for k, a in cols.items()}
                lo = pos - row_start
                for name, a in cols.items():
                    self._buf[name][self._buf_fill : self._buf_fill + take] = a[lo : lo + take]
                self._buf_fill += take
                if self._buf_fill == s1 - s0:
                    self._flush(s, s0, s1)
            pos += take

    def _flush(self, s: int, s0: int, s1: int) -> None:
        buf, self._buf_shard, self._buf_fill = self._buf, None, 0
        if self._pool is None:
            return self._write_shard(s, s0, s1, buf)
        self._wait()  # the previous shard is on disk: its buffer (the spare) may be refilled
        self._pending = self._pool.submit(self._write_shard, s, s0, s1, buf)
        self._buf, self._spare = self._spare, buf

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the writer thread's exception

    def _write_shard(self, s: int, s0: int, s1: int, buf: dict) -> None:
        for name, arr in self._arrays.items():
            # zarr 3.1 reads an existing shard even when the write covers it entirely; a leftover of an
            # interrupted run (or a corrupt object on a store without atomic writes) must not be merged in.
            key = arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))
            sync(arr.store_path.store.delete(f"{arr.store_path.path}/{key}"))
            arr[s0:s1] = buf[name][: s1 - s0]
        t0 = time.perf_counter()
        manifest.write_manifest(self.path, s, manifest.make_shard_manifest(self.path, self._attrs, s))
        self.manifest_seconds += time.perf_counter() - t0
        self._done_arr[s] = 1  # only now is the shard complete on disk
        self._done[s] = self._skip[s] = True

    # ---------------------------------------------------------------- completion
    def close(self, mark_complete: bool = True) -> bool:
        """Mark the store complete if every shard is on disk; returns whether it is complete.

        Rows buffered for a shard that never filled are dropped (a rerun recomputes that shard).
        mark_complete=False: only finish this writer's shards (a rank of a data-parallel run; rank 0 calls
        `finish` once every rank has closed). A second call does nothing.
        """
        if self._closed:
            return self.complete
        self._closed = True
        try:
            self._wait()
        finally:
            self._shutdown()
        if self._buf_fill:
            warnings.warn(
                f"{self.path}: {self._buf_fill} buffered rows of shard {self._buf_shard} dropped at "
                "close (shard incomplete); rerun to finish the cache",
                stacklevel=2,
            )
        self._buf, self._spare, self._buf_shard, self._buf_fill = None, None, None, 0
        return self.finish(reread=self._skip_others) if mark_complete else self.complete

    def finish(self, reread: bool = True) -> bool:
        """Set the root `complete` attribute iff every shard record is on disk. reread: read the records back (other
        ranks wrote some; one object per shard, so skipped when this writer wrote or saw them all)."""
        if reread:
            self._done = self._done_arr[:].astype(bool)
        if self._done.all() and not self.complete:
            self._group.attrs["complete"] = True
            self.complete = True
        return self.complete

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # an exception: a shard already handed to the writer thread is whole, let it finish; mark nothing else
            try:
                self._wait()
            except Exception as e:  # the caller's exception is the one to report
                warnings.warn(f"{self.path}: background shard write failed too: {e!r}", stacklevel=2)
            self._shutdown()
            self._buf, self._spare, self._buf_shard, self._buf_fill = None, None, None, 0
        return False

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _remove_stale_temp_files(path: Path) -> None:
    """Delete LocalStore temp files a killed writer left, so a resumed store has exactly the files of a clean one."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            if _TMP_FILE.search(f):
                os.remove(os.path.join(root, f))


def validated_inputs(
    sample_ids,
    input_ids_per_seq,
    supervised_per_seq,
    *,
    k: int,
    logprob_dtype: str,
    hidden_size: int | None,
    hidden_codec: str | None,
    hidden_basis: codecs.Basis | None,
    shard_rows: int,
) -> tuple[dict, dict]:
    """Check what `CacheWriter.create_or_resume` was given (ValueError names the problem) and turn it into the
    store's per-sequence arrays (`base`: sample ids, offsets, token arrays, a low-rank basis) and its plan."""
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype={logprob_dtype!r}: use one of {sorted(LOGPROB_DTYPES)}")
    if (hidden_codec is None) != (hidden_size is None):
        raise ValueError("hidden_size and hidden_codec must be given together (or both None)")
    rank = codecs.parse(hidden_codec)[1] if hidden_codec else None  # ValueError for an unknown codec
    if rank and not (hidden_basis is not None and hidden_basis.encoder.shape == (rank, hidden_size)):
        raise ValueError(
            f"hidden_codec={hidden_codec} needs a hidden_basis of rank {rank} and width "
            f"{hidden_size}, got {None if hidden_basis is None else hidden_basis.encoder.shape}"
        )
    if hidden_codec:
        codecs.stored_width(hidden_codec, hidden_size)
    basis = hidden_basis.arrays() if rank else {}
    if not (isinstance(k, int) and k > 0 and isinstance(shard_rows, int) and shard_rows > 0):
        raise ValueError(f"k={k!r} and shard_rows={shard_rows!r} must be positive integers")
    n = len(sample_ids)
    if n == 0 or len(input_ids_per_seq) != n or len(supervised_per_seq) != n:
        raise ValueError(
            f"need >= 1 sequence and equal counts: {n} sample_ids, {len(input_ids_per_seq)} "
            f"input_ids, {len(supervised_per_seq)} supervised masks"
        )
    sids = np.array([sid_to_u64(s) for s in sample_ids], dtype=np.uint64)
    if len(np.unique(sids)) != n:
        raise ValueError("sample_ids are not unique: rows are keyed by sample id")
    ids = [np.asarray(x).reshape(-1) for x in input_ids_per_seq]
    sup = [np.asarray(x, dtype=bool).reshape(-1) for x in supervised_per_seq]
    for i, (x, m) in enumerate(zip(ids, sup)):
        if len(x) != len(m) or len(x) == 0:
            raise ValueError(f"sequence {i}: {len(x)} input_ids but {len(m)} supervised flags")
        if m[-1]:  # row j predicts token j+1: the last position has nothing to predict
            raise ValueError(
                f"sequence {i}: last position marked supervised; row j predicts token j+1, "
                "so supervised[j] must be labels[j+1] != -100"
            )
    token_offsets = np.r_[0, np.cumsum([len(x) for x in ids])].astype(np.int64)
    row_offsets = np.r_[0, np.cumsum([m.sum() for m in sup])].astype(np.int64)
    input_ids = np.concatenate(ids).astype(np.int32)
    supervised = np.concatenate(sup).astype(np.uint8)
    plan = make_plan(
        sids,
        token_offsets,
        row_offsets,
        input_ids,
        supervised,
        k=k,
        logprob_dtype=logprob_dtype,
        hidden_codec=hidden_codec,
        hidden_size=hidden_size,
        shard_rows=shard_rows,
        basis_arrays=basis,
    )
    base = {
        "sample_ids": sids,
        "token_offsets": token_offsets,
        "row_offsets": row_offsets,
        "input_ids": input_ids,
        "supervised": supervised,
        **basis,
    }
    return base, plan


def check_matches(path, want: dict) -> None:
    """Refuse an existing store at `path` made from other inputs, or of an older schema (CacheMismatchError,
    naming the first differing field); CacheError when it is not an otkd cache at all."""
    have = canonical_meta(read_root_attrs(path))
    for section in ("provenance", "plan"):
        # who made it first (teacher, tokenizer, data), so the message names the cause, not a symptom
        first = [k for k in IDENTITY if k in have[section]]
        ordered = {**{k: have[section][k] for k in first}, **have[section]}
        d = first_difference(ordered, want[section])
        if d:
            field, old, new = d
            what = (
                "another teacher"
                if "teacher" in field
                else "another tokenizer"
                if "tokenizer" in field
                else "other inputs"
            )
            raise CacheMismatchError(
                f"output path {path} holds a cache from {what} ({section}.{field}: stored {short_repr(old)} "
                f"!= requested {short_repr(new)}); delete it or choose another path"
            )
    if have["schema_version"] != SCHEMA_VERSION:
        # Same inputs, older layout (schema 3: no observed_logprob). Resuming would mix shards with and
        # without the new array, and a complete one lacks it for good: the store must be made again
        # (Stage 1's --replace-mismatched deletes it, as for any other mismatch).
        raise CacheMismatchError(
            f"output path {path} holds a cache of schema {have['schema_version']}, older than the schema "
            f"{SCHEMA_VERSION} this otkd writes; delete it or choose another path"
        )


def create_store(path, base: dict, plan: dict, provenance: dict) -> None:
    """Write a new store: every per-sequence array now, the row arrays empty; locally in a temporary folder renamed
    into place (a killed creation leaves no half store at `path`), on object storage in place."""
    n = len(base["sample_ids"])
    k, logprob_dtype, shard_rows = plan["k"], plan["logprob_dtype"], plan["shard_rows"]
    hidden_codec, hidden_size = plan["hidden_codec"], plan["hidden_size"]
    attrs = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "row_contract": ROW_CONTRACT,
        **{key: plan[key] for key in ("k", "logprob_dtype", "hidden_codec", "hidden_size", "shard_rows")},
        "n_sequences": n,
        "n_tokens": plan["n_tokens"],
        "n_rows": plan["n_rows"],
        "n_shards": n_shards(plan["n_rows"], shard_rows),
        "plan": plan,
        "provenance": provenance,
        "complete": False,
    }
    if is_url(path):
        # Object storage has no directory rename: the store is created in place, `manifest/base` written last.
        # A creation killed midway leaves a store with the right attributes and a missing or short base
        # manifest, which a resume repairs from the inputs like any damaged per-sequence data.
        _create(path, attrs, base, n, plan, k, logprob_dtype, hidden_codec, hidden_size, shard_rows)
        return
    tmp = path.with_name(path.name + ".creating")
    if tmp.exists():  # a creation killed midway; the name is ours, but never delete someone else's data
        if (tmp / "zarr.json").exists():
            read_root_attrs(tmp)
        shutil.rmtree(tmp)
    _create(tmp, attrs, base, n, plan, k, logprob_dtype, hidden_codec, hidden_size, shard_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, path)


def _create(
    root,
    attrs: dict,
    base: dict,
    n: int,
    plan: dict,
    k: int,
    logprob_dtype: str,
    hidden_codec,
    hidden_size,
    shard_rows: int,
) -> None:
    """A new store at `root`: root attributes, every array, the per-sequence data and the base manifest (last)."""
    group = zarr.open_group(root, mode="w-", attributes=attrs)
    specs = array_specs(
        n,
        plan["n_tokens"],
        plan["n_rows"],
        k=k,
        logprob_dtype=logprob_dtype,
        hidden_codec=hidden_codec,
        hidden_size=hidden_size,
        shard_rows=shard_rows,
    )
    for name, spec in specs.items():
        group.create_array(name, **spec)
    group.create_group(manifest.MANIFEST)
    _write_base(root, group, attrs, base)


def _write_base(root, group, attrs: dict, data: dict) -> None:
    """Write the per-sequence and token arrays, then record every file creation made in manifest/base."""
    for name, values in data.items():
        # zarr reads an existing shard even when a write covers it: a damaged one must not be merged in
        location.remove_tree(join(root, name, "c"))
        group[name].with_config({"write_empty_chunks": True})[:] = values
    manifest.write_manifest(root, manifest.BASE, manifest.make_base_manifest(root, attrs))


def _repair_on_resume(path: Path, data: dict) -> None:
    """Undo what fails the stat check against the manifests, so that this run rewrites exactly that.

    A shard whose record exists but whose manifest or files are missing or of the wrong size loses its record
    (and manifest) and the store its `complete` flag; damaged per-sequence data (or array metadata) is
    rewritten here from the inputs, which match the store's plan. Nothing is written when all is well.
    A low-rank basis is also read back (it is small, and every row is encoded with it): one that does not decode
    to the inputs' basis, whatever its file size, is rewritten too.
    """
    group = zarr.open_group(path, mode="r+")
    attrs = group.attrs.asdict()
    problems = manifest.check_base(path, attrs)
    if problems or not all(_holds(group, n, data[n]) for n in BASIS_ARRAYS if n in data):
        _restore_metadata(path, attrs)
        _write_base(path, group, attrs, data)
    done, unreadable = manifest.read_done(group)
    done_bad = sorted(
        set(unreadable) | {p.shard for p in manifest.check_store(path, attrs, done) if p.shard is not None}
    )
    if not done_bad:
        return
    for s in done_bad:
        sync(group.store.delete(f"shard_done/c/{s}"))  # reads as the fill value 0: not done
        manifest.delete_manifest(path, s)
    if attrs.get("complete"):
        group.attrs["complete"] = False


def _holds(group, name: str, values: np.ndarray) -> bool:
    """Whether array `name` decodes to exactly `values` (False if it is missing or fails its checksum)."""
    try:
        return bool(np.array_equal(group[name][...], values))
    except Exception:
        return False


def _restore_metadata(path: Path, attrs: dict) -> None:
    """Rewrite any array's zarr.json that differs from what creation writes (deleted or altered metadata)."""
    specs = array_specs(
        attrs["n_sequences"],
        attrs["n_tokens"],
        attrs["n_rows"],
        k=attrs["k"],
        logprob_dtype=attrs["logprob_dtype"],
        hidden_codec=hidden_codec(attrs),
        hidden_size=attrs["hidden_size"],
        shard_rows=attrs["shard_rows"],
        observed=has_observed(attrs),
    )
    with tempfile.TemporaryDirectory() as tmp:
        g = zarr.open_group(Path(tmp) / "m.zarr", mode="w")
        g.create_group(manifest.MANIFEST)
        for name, spec in (*specs.items(), (manifest.MANIFEST, None)):
            if spec is not None:
                g.create_array(name, **spec)
            want = (Path(tmp) / "m.zarr" / name / "zarr.json").read_bytes()
            have = join(path, name, "zarr.json")
            try:
                same = location.read_bytes(have) == want
            except FileNotFoundError:
                same = False
            if not same:
                location.write_atomic(have, want)

"""Reading a teacher cache in Stage 2: validation on open, per-sequence reads, a lazy torch Dataset.

Reads are per-sequence slices only (integer-array indexing, `oindex`, on sharded arrays was measured 3-13x
slower than slices with zarr-python 3.1), and the slices of one sequence or of a whole minibatch are issued
together on zarr's event loop so their shard/chunk fetches overlap. Only the small per-sequence arrays (ids, offsets)
are held in memory; token and row data stay on disk until asked for.

Integrity: `open_cache` stats every file of every finished shard against its manifest (cache/manifest.py), so a
deleted or truncated file makes the store "incomplete" instead of reading as fill values. On read, a chunk
that fails its crc32c or does not decode, and ids outside [0, tokenizer_size) or other fill values, raise a
one-line `CacheCorruptError` naming the array, shard and file and the repair command.
"""

import asyncio
import os

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from cache import codecs, location, manifest
from cache.errors import CacheCorruptError, CacheError, CacheMismatchError
from cache.schema import (
    BASIS_ARRAYS,
    FIELDS,
    canonical,
    canonical_meta,
    decode_float,
    has_observed,
    hidden_codec,
    read_basis,
    read_root_attrs,
    shard_key,
    short_repr,
    sid_to_u64,
    u64_to_sid,
)

STAGE1 = "python -m stages.cache_teacher"
VERIFY = "python -m stages.verify_cache"


def corrupt_error(path, array: str, shard: int, file: str, what: str) -> CacheCorruptError:
    return CacheCorruptError(
        f"corrupt teacher cache at {path}: {array} shard {shard} (file {file}) {what} — run "
        f"`{VERIFY} {path} --repair`, then rerun `{STAGE1}` to rewrite the bad shards"
    )


def decode_failure(e: Exception) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    if "checksum" in msg.lower():
        return "fails its crc32c checksum (bytes changed on disk)"
    return f"cannot be decoded ({type(e).__name__}: {msg[:80]})"


def read_checked(path, arr, name: str, lo: int | None = None, hi: int | None = None):
    """arr[lo:hi]; a failure that one of its shards reproduces on its own becomes a CacheCorruptError."""
    lo, hi = (0, arr.shape[0]) if lo is None else (lo, hi)
    try:
        return arr[lo:hi]
    except Exception as e:
        raise locate_failure(path, arr, name, lo, hi) or e  # noqa: B904


def locate_failure(path, arr, name: str, lo: int, hi: int) -> CacheCorruptError | None:
    """After a failed read of rows [lo, hi): re-read shard by shard and name the first one that fails."""
    span = arr.shards[0] if arr.shards else arr.chunks[0]
    for s in range(lo // span, (max(hi, lo + 1) - 1) // span + 1):
        try:
            arr[max(lo, s * span) : min(hi, (s + 1) * span)]
        except Exception as e:
            return corrupt_error(path, name, s, shard_key(name, s, arr.ndim), decode_failure(e))
    return None


def open_cache(path, expect: dict | None = None) -> "TeacherCache":
    """Open a complete cache, or raise a one-line CacheError saying what is wrong and what to run.

    expect: {key: value} checked against the store's provenance (or, for keys not in it, the root attributes
    such as k or logprob_dtype); a difference raises CacheMismatchError naming the key and both values.
    """
    path = location.loc(path)
    if not location.exists(path):
        raise CacheError(f"no teacher cache at {path} — run `{STAGE1}` first")
    attrs = read_root_attrs(path)
    group = zarr.open_group(path, mode="r")
    done, unreadable = manifest.read_done(group)
    if not (attrs.get("complete") and done.all()):
        raise CacheError(
            f"incomplete teacher cache at {path} ({int(done.sum())}/{len(done)} shards written) — "
            f"rerun `{STAGE1}` to resume it"
        )
    problems = manifest.check_store(path, attrs, done)  # stat only: ~1 us per file
    if problems:
        raise CacheError(
            f"incomplete teacher cache at {path}: {manifest.summary(problems)} — rerun `{STAGE1}`, "
            "which rewrites exactly the shards that fail this check"
        )
    for key, value in (expect or {}).items():
        prov = attrs.get("provenance", {})
        if key in prov:
            stored = prov[key]
        elif key in attrs:
            stored = attrs[key]
        else:
            raise CacheMismatchError(f"teacher cache at {path} does not record {key!r} (expected {short_repr(value)})")
        if canonical(stored) != canonical(value):
            raise CacheMismatchError(
                f"teacher cache at {path} was made with {key}={short_repr(stored)} but "
                f"{key}={short_repr(value)} is expected; rerun `{STAGE1}` with matching settings"
            )
    return TeacherCache(path, attrs)


def describe(path) -> dict:
    """A store's identity in canonical comparable form: {schema_version, plan, provenance} (complete or not).

    Two stores (or a store and a request) hold the same teacher targets iff these dicts are equal.
    """
    path = location.loc(path)
    if not location.exists(path):
        raise CacheError(f"no teacher cache at {path} — run `{STAGE1}` first")
    return canonical_meta(read_root_attrs(path))


def _readable(group, name: str) -> bool:
    try:
        return bool(np.isfinite(group[name][...]).all())
    except Exception:
        return False


async def _gather(coros):
    return await asyncio.gather(*coros)


class TeacherCache:
    """Read access to a complete cache. Picklable: zarr handles are reopened lazily in each process.

    read(i) returns numpy arrays: input_ids (L,) int64, supervised (L,) bool, topk_ids (R_i, k) int64,
    topk_logprobs (R_i, k) float32, tail_logmass (R_i,) float32, observed_logprob (R_i,) float32 (the teacher's
    log-prob of each row's target token; only in stores of schema >= 4, see `has_observed`; requesting it from an
    older store raises CacheMismatchError), hidden (R_i, D) float32 (decoded by the store's hidden codec,
    `cache/codecs.py`: the exact widening of bf16/fp16; present only if the cache has hidden states), plus
    sample_id (hex str) and index. A low-rank cache also gives "hidden_code" (R_i, r) float32 on
    request: the stored coefficients c of h = mean + c F (`self.basis`), for a consumer that folds the basis into
    what it multiplies h with (Stage 2's exact teacher).
    Row r of the sequence is the teacher's distribution over the token after the r-th supervised position:
    input_ids[np.flatnonzero(supervised) + 1] are the tokens the rows predict.
    """

    def __init__(self, path, attrs: dict):
        self.path, self.attrs = location.loc(path), attrs
        self.k, self.provenance = attrs["k"], attrs["provenance"]
        g = zarr.open_group(self.path, mode="r")
        self._sids = read_checked(self.path, g["sample_ids"], "sample_ids")
        self.token_offsets = read_checked(self.path, g["token_offsets"], "token_offsets")
        self.row_offsets = read_checked(self.path, g["row_offsets"], "row_offsets")
        self.has_hidden = "hidden" in g
        self.schema_version = attrs.get("schema_version")
        self.hidden_codec = hidden_codec(attrs)  # None without hidden states
        self.hidden_size = attrs.get("hidden_size")
        self.plan_basis = attrs.get("plan", {}).get("hidden_basis_sha")  # which basis encoded the rows
        try:
            self.basis = read_basis(g, attrs)  # (low-rank codecs) decodes every read: read once here
        except Exception as e:
            name = next((n for n in BASIS_ARRAYS if not _readable(g, n)), BASIS_ARRAYS[0])
            raise corrupt_error(
                self.path, name, 0, shard_key(name, 0, 1 if name == "hidden_mean" else 2), decode_failure(e)
            ) from None
        self.shard_rows = attrs["shard_rows"]
        self.vocab = attrs.get("provenance", {}).get("tokenizer_size")  # ids must lie in [0, vocab)
        self.check_values = True  # the per-read range checks below (bench: off to measure their cost)
        for name, off, n in (
            ("token_offsets", self.token_offsets, attrs["n_tokens"]),
            ("row_offsets", self.row_offsets, attrs["n_rows"]),
        ):
            if len(off) == 0 or off[0] != 0 or off[-1] != n or (np.diff(off) < 0).any():
                raise corrupt_error(
                    self.path, name, 0, shard_key(name, 0, 1), f"is not a monotone offset table from 0 to {n}"
                )
        self._index = None
        self._arrays, self._pid = None, None

    def __len__(self) -> int:
        return len(self._sids)

    @property
    def has_observed(self) -> bool:
        """Whether the store holds observed_logprob (schema >= 4; open_cache has checked its files exist)."""
        return has_observed(self.attrs)

    @property
    def sample_ids(self) -> list[str]:
        return [u64_to_sid(v) for v in self._sids]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sequence (for length-bucketed batching without reading any token data)."""
        return np.diff(self.token_offsets)

    @property
    def n_rows(self) -> np.ndarray:
        """Stored rows (supervised positions) per sequence."""
        return np.diff(self.row_offsets)

    def index_of(self, sample_id: str) -> int:
        if self._index is None:
            self._index = {int(v): i for i, v in enumerate(self._sids)}
        try:
            return self._index[sid_to_u64(sample_id)]
        except KeyError:
            raise KeyError(f"sample {sample_id} is not in the teacher cache {self.path}") from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, None  # open handles stay in the process that made them
        return state

    def _arrs(self) -> dict:
        if self._arrays is None or self._pid != os.getpid():
            g = zarr.open_group(self.path, mode="r")
            names = [n for n in (*FIELDS, "hidden_scale") if n in g]
            self._arrays = {n: g[n] for n in names}
            self._logical = {n: self._arrays[n].attrs.get("logical_dtype") for n in names}
            self._pid = os.getpid()
        return self._arrays

    def _fields(self, fields) -> list[str]:
        have = {"hidden": self.has_hidden, "observed_logprob": self.has_observed}
        avail = [f for f in FIELDS if have.get(f, True)] + (["hidden_code"] if self.basis else [])
        if fields is None:
            return avail
        if "observed_logprob" in fields and not self.has_observed:
            # an old store, not a typo: say what makes the field exist
            raise CacheMismatchError(
                f"teacher cache at {self.path} has schema {self.schema_version}, which predates observed_logprob "
                f"(schema 4): rerun Stage 1 (`{STAGE1} --replace-mismatched`, or delete the store first) to rewrite it"
            )
        bad = [f for f in fields if f not in avail]
        if bad:
            raise KeyError(f"field {bad[0]!r} not in this cache (available: {', '.join(avail)})")
        return list(fields)

    def read(self, i: int, fields=None) -> dict:
        """One sequence; `fields` (e.g. without "hidden") limits what is read from disk."""
        return self.read_many([i], fields)[0]

    def read_many(self, indices, fields=None) -> list[dict]:
        """Several sequences with all their slices fetched concurrently (one event-loop round trip).

        Runs of consecutive indices are read as ONE slice per field and split in memory: zarr 3.1 costs ~1 ms
        per slice whatever its size, so a batch of neighbouring sequences (see `CacheBlocks`) reads
        ~20x faster than the same number of scattered ones.
        """
        fields, arrs = self._fields(fields), self._arrs()
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"sequence {i} out of range for a cache of {len(self)}")
        runs = []  # [first, last] of each run of consecutive indices, in request order
        for i in indices:
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        coros, keys = [], []
        fetch = fields + (["hidden_scale"] if "hidden" in fields and "hidden_scale" in arrs else [])
        for first, last in runs:
            for f in fetch:
                off = self.token_offsets if f in ("input_ids", "supervised") else self.row_offsets
                arr = arrs["hidden" if f == "hidden_code" else f]
                coros.append(arr.async_array.getitem(slice(int(off[first]), int(off[last + 1]))))
                keys.append((first, last, f, off))
        try:
            got = sync(_gather(coros)) if coros else []
        except Exception as e:  # name the shard that fails on its own (a checksum, blosc or shard-index error)
            for first, last, f, off in keys:
                name = "hidden" if f == "hidden_code" else f
                err = locate_failure(self.path, arrs[name], name, int(off[first]), int(off[last + 1]))
                if err is not None:
                    raise err from None
            raise e
        out = {i: {"index": i, "sample_id": u64_to_sid(self._sids[i])} for i in indices}
        got = dict(zip([(first, f) for first, _, f, _ in keys], got))
        for first, last, f, off in keys:
            if f == "hidden_scale":
                continue  # decoded with `hidden`
            a = got[first, f]
            if self.check_values:
                self._check(f, a, int(off[first]))
            if f == "hidden":  # (rows, W) stored -> (rows, D) float32
                a = codecs.decode(
                    {"hidden": a, "hidden_scale": got.get((first, "hidden_scale"))}, self.hidden_codec, self.basis
                )
            elif f == "hidden_code":  # a low-rank code's coefficients as stored: (rows, r) float32
                a = codecs.coefficients(a)
            else:
                a = self._decode(f, a)
            for i in range(first, last + 1):
                out[i][f] = a[off[i] - off[first] : off[i + 1] - off[first]]
        return [out[i] for i in indices]

    def _check(self, field: str, a: np.ndarray, start: int) -> None:
        """Values no writer stores (fill values of missing chunks, ids beyond the vocabulary) -> CacheCorruptError."""
        if field in ("input_ids", "topk_ids"):
            if a.size == 0:
                return
            lo, hi = a.min(), a.max()
            if lo >= 0 and (self.vocab is None or hi < self.vocab):
                return
            bad = (a < 0) | (a >= self.vocab) if self.vocab is not None else a < 0
            what = f"holds id {int(a[bad].flat[0])} outside [0, {self.vocab or 'int32 max'})"
        elif field == "supervised":
            if a.size == 0 or a.max() <= 1:
                return
            bad, what = a > 1, "holds supervised flags other than 0/1"
        elif field in ("tail_logmass", "observed_logprob"):
            if not np.isnan(a).any():
                return
            kind = "tail mass" if field == "tail_logmass" else "observed log-probs"
            bad, what = np.isnan(a), f"holds NaN {kind} (a missing chunk's fill value)"
        else:
            return
        first = start + int(np.flatnonzero(bad.reshape(len(a), -1).any(1))[0])
        arr = self._arrs()[field]
        span = arr.shards[0]
        raise corrupt_error(
            self.path, field, first // span, shard_key(field, first // span, arr.ndim), f"{what} at index {first}"
        )

    def _decode(self, field: str, a: np.ndarray) -> np.ndarray:
        if field in ("input_ids", "topk_ids"):
            return a.astype(np.int64)  # torch indexing and gather want int64
        if field == "supervised":
            return a.astype(bool)
        return decode_float(a, self._logical[field])


class CacheBlocks(torch.utils.data.Dataset):
    """A cache as a dataset of blocks: item i is the list of reads of `block` consecutive cache entries.

    A DataLoader with batch_size=1 over this dataset (shuffled or not, sharded across data-parallel ranks or
    not) yields whole blocks, so one training batch is one block: one Zarr slice per field (`read_many`), ~20x
    faster than the same number of scattered sequences, and a length bucket for free (Stage 1 stores sequences
    sorted by length, so neighbours have similar lengths and little padding). Shuffling and sharding act on
    blocks, with any standard sampler. The last block may be short.

    `fraction` < 1 keeps a share of the blocks, chosen by a hash of each block's first sample id: the same blocks
    in any run, nested across fractions (a block kept at 0.1 is kept at 0.3), and each still one contiguous read.
    """

    def __init__(self, cache: "TeacherCache", block: int, fields=None, fraction: float = 1.0):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.cache, self.block = cache, block
        self.fields = cache._fields(fields)
        starts = range(0, len(cache), block)
        # bits 0-32 of the sample id (the data split hashes the prompt, not the sample id: independent of it)
        self.starts = [s for s in starts if fraction == 1 or int(u64_to_sid(cache._sids[s])[:8], 16) / 2**32 < fraction]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> list[dict]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        start = self.starts[i]
        return self.cache.read_many(range(start, min(start + self.block, len(self.cache))), self.fields)


class CacheDataset(torch.utils.data.Dataset):
    """Lazy map-style dataset over a cache: each item is `TeacherCache.read(i, fields)` (numpy arrays).

    Holds only the path and the per-sequence index; DataLoader workers reopen the store themselves.
    Defines __getitems__, so a DataLoader with a batch_sampler fetches a whole minibatch in one round trip
    (give it a collate_fn that takes a list of these dicts).
    """

    def __init__(self, cache, fields=None, expect: dict | None = None):
        self.cache = cache if isinstance(cache, TeacherCache) else open_cache(cache, expect)
        self.fields = self.cache._fields(fields)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        return self.cache.read(i, self.fields)

    def __getitems__(self, indices) -> list[dict]:
        return self.cache.read_many(indices, self.fields)

"""Manifests of a teacher cache: the files a finished shard (or the store's creation) wrote, with their byte
sizes and CRC-32, and the checks against them: stat only at open and on resume, hashes in stages.verify_cache.

FORMAT (schema 2). Each manifest is the attributes of a Zarr group inside the store, so plain Zarr lists and
reads it (`zarr.open_group(store)["manifest/3"].attrs`) and every object stays a Zarr node:
  manifest/base  {"kind": "base", "files": [...]}: every chunk file of the per-sequence and token arrays and
                 every array's zarr.json, written at creation (before the store is renamed into place)
  manifest/<s>   {"kind": "shard", "shard": s, "rows": [s0, s1], "files": [...]}: shard s's file of every row
                 array, written after those files and before shard s's `shard_done` record
  files          [{"array": "topk_ids", "file": "topk_ids/c/3/0", "bytes": 81234, "crc32": "9f0c1a2b"}, ...]
                 file: path relative to the store; crc32: zlib's CRC-32 (IEEE) of the whole file, 8 hex digits.
                 Not crc32c: a shard file is a sequence of blocks each followed by its own crc32c, and the
                 crc32c of such a file is a constant (CRC residue; measured: every shard file gives 7059f117),
                 so it would detect nothing. zlib.crc32 runs at ~3.8 GB/s here (blake2b ~0.85 GB/s).
A shard counts as done only if its record, its manifest and its files with the manifest's sizes all exist.
Each manifest is one file replaced atomically (temp file + rename, like LocalStore's writes; one PUT on object
storage). Stores on fsspec URLs are checked the same way (cache/location.py).
"""

import json
from dataclasses import dataclass

import numpy as np

from cache import codecs, location
from cache.location import join
from cache.schema import BASIS_ARRAYS, ROW_ARRAYS, SEQ_SHARD, has_observed, hidden_codec, shard_key

MANIFEST = "manifest"
BASE = "base"
SEQ_ARRAYS = ("sample_ids", "token_offsets", "row_offsets", "input_ids", "supervised")
ROW_NDIM = {"topk_ids": 2, "topk_logprobs": 2, "tail_logmass": 1, "observed_logprob": 1, "hidden": 2, "hidden_scale": 1}


@dataclass(frozen=True)
class Problem:
    """One integrity problem. shard None: the per-sequence data written at creation (Stage 1 rewrites it)."""

    array: str
    shard: int | None
    file: str  # relative to the store
    what: str
    check: str = "files"  # which check found it: files (stat/CRC-32 vs manifest), records, chunks, contract

    def line(self) -> str:
        where = (
            f"shard {self.shard}"
            if self.shard is not None
            else ("basis" if self.array in BASIS_ARRAYS else "per-sequence data")
        )
        return f"{self.array} {where} (file {self.file}): {self.what}"


def crc32_file(path) -> str:
    return location.crc32(path)


def row_arrays(attrs: dict) -> list[str]:
    """The row arrays a store holds, from its attributes (hidden codec, schema version for observed_logprob)."""
    codec = hidden_codec(attrs)
    optional = {"hidden": bool(codec), "hidden_scale": codec == "int8", "observed_logprob": has_observed(attrs)}
    return [n for n in ROW_ARRAYS if optional.get(n, True)]


def basis_arrays(attrs: dict) -> list[str]:
    """The low-rank basis arrays a store holds (none for the other codecs)."""
    codec = hidden_codec(attrs)
    return list(BASIS_ARRAYS) if codec and codecs.parse(codec)[1] else []


def shard_rows(attrs: dict, s: int) -> tuple[int, int]:
    r = attrs["shard_rows"]
    return s * r, min((s + 1) * r, attrs["n_rows"])


def shard_files(attrs: dict, s: int) -> list[tuple[str, str]]:
    """(array, file) of shard s of every row array."""
    return [(n, shard_key(n, s, ROW_NDIM[n])) for n in row_arrays(attrs)]


def base_files(attrs: dict) -> list[tuple[str, str]]:
    """(array, file) of everything creation writes: per-sequence/token chunk files and every array's zarr.json."""
    n_seq, n_tok = attrs["n_sequences"], attrs["n_tokens"]
    length = {
        "sample_ids": n_seq,
        "token_offsets": n_seq + 1,
        "row_offsets": n_seq + 1,
        "input_ids": n_tok,
        "supervised": n_tok,
    }
    basis = basis_arrays(attrs)
    out = [(n, f"{n}/zarr.json") for n in (*SEQ_ARRAYS, *row_arrays(attrs), *basis, "shard_done")]
    for n in SEQ_ARRAYS:
        out += [(n, shard_key(n, j, 1)) for j in range(-(-length[n] // SEQ_SHARD))]
    out += [(n, shard_key(n, 0, 1 if n == "hidden_mean" else 2)) for n in basis]  # one chunk each
    return out


def _entry(root, array: str, rel: str) -> dict:
    p = join(root, rel)
    return {"array": array, "file": rel, "bytes": location.size(p), "crc32": crc32_file(p)}


def make_shard_manifest(root, attrs: dict, s: int) -> dict:
    return {
        "kind": "shard",
        "shard": s,
        "rows": list(shard_rows(attrs, s)),
        "files": [_entry(root, a, f) for a, f in shard_files(attrs, s)],
    }


def make_base_manifest(root, attrs: dict) -> dict:
    return {"kind": "base", "files": [_entry(root, a, f) for a, f in base_files(attrs)]}


def manifest_file(key) -> str:
    return f"{MANIFEST}/{key}/zarr.json"


def write_manifest(root, key, doc: dict) -> None:
    data = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": doc}, indent=1, sort_keys=True)
    location.write_atomic(join(root, manifest_file(key)), data.encode())


def read_manifest(root, key) -> dict | None:
    """The manifest's document, or None if it is missing or unreadable."""
    try:
        doc = json.loads(location.read_bytes(join(root, manifest_file(key))))["attributes"]
        return doc if isinstance(doc.get("files"), list) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def delete_manifest(root, key) -> None:
    location.remove(join(root, manifest_file(key)))


def _check_files(root, doc: dict, expected, shard, hashes: bool, files: dict | None) -> list[Problem]:
    by_file = {e.get("file"): e for e in doc["files"] if isinstance(e, dict)}
    out = []
    for array, rel in expected:
        e = by_file.get(rel)
        if e is None:
            out.append(Problem(array, shard, rel, "not listed in its manifest"))
            continue
        try:
            size = location.size(join(root, rel)) if files is None else files[rel]
        except (FileNotFoundError, KeyError):
            out.append(Problem(array, shard, rel, f"file missing (manifest: {e.get('bytes')} bytes)"))
            continue
        if size != e.get("bytes"):
            out.append(
                Problem(array, shard, rel, f"{size} bytes, manifest says {e.get('bytes')} (truncated or rewritten)")
            )
        elif hashes and (got := crc32_file(join(root, rel))) != e.get("crc32"):
            out.append(Problem(array, shard, rel, f"crc32 {got} != manifest {e.get('crc32')} (bytes changed on disk)"))
    return out


def check_base(root, attrs: dict, hashes: bool = False, files: dict | None = None) -> list[Problem]:
    """files: {relative path: bytes} of the store in one listing (a remote store), else each file is stat'ed."""
    doc = read_manifest(root, BASE)
    if doc is None:
        return [Problem("manifest", None, manifest_file(BASE), "manifest missing or unreadable")]
    return _check_files(root, doc, base_files(attrs), None, hashes, files)


def check_shard(root, attrs: dict, s: int, hashes: bool = False, files: dict | None = None) -> list[Problem]:
    doc = read_manifest(root, s)
    if doc is None:
        return [
            Problem("manifest", s, manifest_file(s), "completion record without a manifest (missing or unreadable)")
        ]
    return _check_files(root, doc, shard_files(attrs, s), s, hashes, files)


def check_store(root, attrs: dict, done, hashes: bool = False) -> list[Problem]:
    """Problems of the base files and of every shard marked done (stat only unless hashes=True)."""
    files = location.listing(root)  # a remote store: one listing instead of a request per file
    out = check_base(root, attrs, hashes, files)
    for s in np.flatnonzero(np.asarray(done)):
        out += check_shard(root, attrs, int(s), hashes, files)
    return out


def summary(problems: list[Problem], n: int = 1) -> str:
    """The first n problems in one line, plus how many more (and which shards) there are."""
    head = "; ".join(p.line() for p in problems[:n])
    more = len(problems) - n
    if more > 0:
        shards = sorted({p.shard for p in problems if p.shard is not None})
        head += f" (and {more} more problem{'s' if more > 1 else ''}"
        head += f"; shards {short_list(shards)})" if shards else ")"
    return head


def short_list(xs, n: int = 8) -> str:
    xs = list(xs)
    return ", ".join(map(str, xs[:n])) + (f", ... ({len(xs)} in all)" if len(xs) > n else "")


def read_done(group) -> tuple[np.ndarray, list[int]]:
    """(done flags, shards whose shard_done record cannot be decoded); an unreadable record counts as not done."""
    arr = group["shard_done"]
    try:
        return arr[:].astype(bool), []
    except Exception:  # a damaged record object: find which, one by one (error path only)
        done, bad = np.zeros(arr.shape[0], bool), []
        for s in range(arr.shape[0]):
            try:
                done[s] = bool(arr[s])
            except Exception:
                bad.append(s)
        return done, bad

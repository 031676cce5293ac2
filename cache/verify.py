"""Verify a teacher cache end to end and repair what fails (the logic of `python -m stages.verify_cache`).

verify(path) checks, shard by shard:
  files     every file listed in the manifests exists with its recorded size (--quick stops here: stat only)
            and CRC-32 (cache/manifest.py)
  records   every shard has a readable completion record and the store its `complete` flag
  chunks    every chunk decodes and passes its crc32c (bytes -> blosc -> crc32c inside each shard)
  contract  the row contract (cache/schema.py): ids in [0, provenance tokenizer_size) and distinct per row,
            log-probs finite and in descending order, top-k + tail mass sums to 1 within the bound the
            storage dtype allows, tail finite, hidden finite, observed log-prob (schema >= 4) finite, <= 0 and
            consistent with the row's top-k (equal to the target's top-k log-prob when the target is in it, else
            at most the k-th, within the log-prob dtype's rounding); offsets start at 0, are monotone and end at the
            array lengths, each sequence's row count equals its supervised flags (0/1, last one 0), sample
            ids unique, input ids in range.
repair(path, report) drops the completion records (shard_done, manifest, root `complete`) of every shard
with a problem, and the base manifest if the per-sequence data has one, so that the next Stage 1 run
(CacheWriter.create_or_resume) rewrites exactly those shards and that data.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.core.sync import sync

from cache import location, manifest
from cache.errors import CacheError
from cache.manifest import Problem
from cache.reader import STAGE1, VERIFY, decode_failure
from cache.schema import BASIS_ARRAYS, LOG_FLOOR, decode_float, hidden_codec, read_root_attrs, shard_key

# unit roundoff of each stored log-prob dtype: a stored log-prob is within u * |lp| of the computed one
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24}
MASS_SLACK = 1e-4  # float32 arithmetic of the teacher's log-softmax, top-k and tail (measured: < 1e-5)
# The observed log-prob is x[target] - lse in float32 with the top-k's own lse: bit-equal to the top-k value before
# that is rounded to the stored dtype. The slack only covers values near 0, where the relative bound is ~0.
OBSERVED_SLACK = 1e-6
CHECKS = ("files", "records", "chunks", "contract")


@dataclass
class Report:
    path: Path
    quick: bool
    attrs: dict
    problems: list = field(default_factory=list)
    not_done: int = 0
    shards_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.not_done and bool(self.attrs.get("complete"))

    def text(self, max_lines: int = 12) -> str:
        a = self.attrs
        hidden = f"hidden {hidden_codec(a)} of {a['hidden_size']}" if hidden_codec(a) else "no hidden"
        mode = (
            "quick: files stat-checked against the manifests, nothing read"
            if self.quick
            else "full: every file's CRC-32, every chunk decoded, row contract"
        )
        mb = self.bytes_checked / 1e6
        size = f"{mb:.1f} MB" if mb >= 0.1 else f"{self.bytes_checked / 1e3:.1f} kB"
        lines = [
            f"verify {self.path} ({mode})",
            f"  store     {a['n_sequences']} sequences, {a['n_tokens']} tokens, {a['n_rows']} rows in "
            f"{a['n_shards']} shards of {a['shard_rows']} rows; k={a['k']}, log-probs {a['logprob_dtype']}, "
            f"{hidden}",
            f"  checked   {self.shards_checked}/{a['n_shards']} shards + per-sequence data, {size} in "
            f"{self.seconds:.2f} s" + (f" ({mb / self.seconds:.0f} MB/s)" if mb >= 1 else ""),
        ]
        for check in CHECKS:
            if self.quick and check in ("chunks", "contract"):
                lines.append(f"  {check:<9} not checked (--quick)")
                continue
            n = sum(p.check == check for p in self.problems)
            lines.append(f"  {check:<9} {'OK' if n == 0 else f'{n} problem' + ('s' if n > 1 else '')}")
        if self.not_done or not a.get("complete"):
            lines.append(
                f"  complete  no: {self.not_done} of {a['n_shards']} shards not written yet — rerun "
                f"`{STAGE1}` to finish it"
            )
        if self.problems:
            lines.append(f"PROBLEMS ({len(self.problems)}):")
            lines += [f"  {p.line()}" for p in self.problems[:max_lines]]
            if len(self.problems) > max_lines:
                lines.append(f"  ... and {len(self.problems) - max_lines} more")
            shards = sorted({p.shard for p in self.problems if p.shard is not None})
            base = any(p.shard is None for p in self.problems)
            what = ", ".join(
                filter(
                    None,
                    [f"shards {manifest.short_list(shards)}" if shards else "", "per-sequence data" if base else ""],
                )
            )
            lines.append(
                f"result: {len(self.problems)} problem(s) in {what} — run `{VERIFY} {self.path} "
                f"--repair`, then rerun `{STAGE1}`, which rewrites exactly those"
            )
        else:
            lines.append("result: CLEAN" if self.ok else "result: no damage found, but the store is incomplete")
        return "\n".join(lines)


def verify(path, quick: bool = False, progress: bool = True) -> Report:
    """Check a store (see the module docstring); raises CacheError only if `path` is not an otkd cache."""
    path = location.loc(path)
    if not location.exists(path):
        raise CacheError(f"no teacher cache at {path} — run `{STAGE1}` first")
    t0 = time.perf_counter()
    attrs = read_root_attrs(path)
    rep = Report(path, quick, attrs)
    group = zarr.open_group(path, mode="r")
    done, unreadable = manifest.read_done(group)
    rep.problems += [
        Problem("shard_done", s, f"shard_done/c/{s}", "completion record cannot be decoded", "records")
        for s in unreadable
    ]
    rep.not_done = int((~done).sum()) - len(unreadable)
    total = sum(_listed_bytes(path, key) for key in [manifest.BASE, *map(int, np.flatnonzero(done))])
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"verify {location.name(path)}", disable=not progress, leave=False
    ) as bar:
        found = manifest.check_base(path, attrs, hashes=not quick)
        rep.problems += found
        targets = None  # (R,) each row's target token, when the per-sequence data is sound
        if not quick and not any(p.array == "manifest" for p in found):
            base_problems, targets = _check_base_contract(path, group, attrs)
            rep.problems += base_problems
        rep.bytes_checked += _listed_bytes(path, manifest.BASE)
        bar.update(_listed_bytes(path, manifest.BASE))
        for s in map(int, np.flatnonzero(done)):
            found = manifest.check_shard(path, attrs, s, hashes=not quick)
            rep.problems += found
            if not quick and not any("missing" in p.what or "bytes, manifest" in p.what for p in found):
                rep.problems += _check_shard_data(path, group, attrs, s, targets)
            n = _listed_bytes(path, s)
            rep.bytes_checked += n
            rep.shards_checked += 1
            bar.update(n)
    rep.seconds = time.perf_counter() - t0
    return rep


def repair(path, report: Report) -> list[str]:
    """Drop the completion records of everything `report` found bad; returns what was done (one line each)."""
    path = location.loc(path)
    shards = sorted({p.shard for p in report.problems if p.shard is not None})
    base = any(p.shard is None for p in report.problems)
    if not shards and not base:
        return []
    group = zarr.open_group(path, mode="r+")
    for s in shards:
        sync(group.store.delete(f"shard_done/c/{s}"))  # reads as the fill value 0: not done
        manifest.delete_manifest(path, s)
    if base:
        manifest.delete_manifest(path, manifest.BASE)  # the next Stage 1 run rewrites the per-sequence data
    group.attrs["complete"] = False
    done = []
    if shards:
        done.append(f"dropped the completion records of shards {manifest.short_list(shards)}")
    if base:
        done.append("dropped the record of the per-sequence data (it is rewritten from the inputs)")
    done.append(f"now rerun `{STAGE1}` (same params) to rewrite exactly those")
    return done


def _listed_bytes(path: Path, key) -> int:
    doc = manifest.read_manifest(path, key)
    return sum(int(e.get("bytes") or 0) for e in doc["files"] if isinstance(e, dict)) if doc else 0


def _read(path: Path, group, name: str, s: int, lo: int, hi: int, out: list):
    """group[name][lo:hi], or None after recording the decoding failure (a chunk problem of shard s)."""
    arr = group[name]
    try:
        return arr[lo:hi]
    except Exception as e:
        shard = None if name in (*manifest.SEQ_ARRAYS, *BASIS_ARRAYS) else s
        j = s if shard is not None else lo // (arr.shards or arr.chunks)[0]  # the basis arrays are unsharded
        out.append(Problem(name, shard, shard_key(name, j, arr.ndim), decode_failure(e), "chunks"))
        return None


def _check_shard_data(path: Path, group, attrs: dict, s: int, targets: np.ndarray | None) -> list[Problem]:
    """Decode shard s's row arrays and check the row contract; targets: (n_rows,) each row's target token, or None
    (the per-sequence data failed its checks: the observed log-probs' top-k consistency is then not checked)."""
    s0, s1 = manifest.shard_rows(attrs, s)
    out = []
    got = {n: _read(path, group, n, s, s0, s1, out) for n in manifest.row_arrays(attrs)}

    def bad(name, mask, what):
        rows = np.flatnonzero(mask)
        if len(rows):
            out.append(
                Problem(
                    name,
                    s,
                    shard_key(name, s, manifest.ROW_NDIM[name]),
                    f"{len(rows)} row(s) {what} (first: row {s0 + rows[0]})",
                    "contract",
                )
            )
        return rows

    vocab = attrs.get("provenance", {}).get("tokenizer_size")
    ids = got["topk_ids"]
    if ids is not None:
        hi = vocab if vocab is not None else np.iinfo(np.int32).max
        rows = bad("topk_ids", ((ids < 0) | (ids >= hi)).any(1), f"with ids outside [0, {hi})")
        if not len(rows):
            srt = np.sort(ids, axis=1)
            bad("topk_ids", (srt[:, 1:] == srt[:, :-1]).any(1), "with repeated ids")
    lp = got["topk_logprobs"]
    if lp is not None:
        lp = decode_float(lp, group["topk_logprobs"].attrs.get("logical_dtype"))
        finite = bad("topk_logprobs", ~np.isfinite(lp).all(1), "with non-finite log-probs")
        if not len(finite):
            bad(
                "topk_logprobs",
                (np.diff(lp, axis=1) > 0).any(1) | (lp > 0).any(1),
                "with log-probs not descending or above 0",
            )
    tail = got["tail_logmass"]
    if tail is not None:
        tail_bad = bad("tail_logmass", ~np.isfinite(tail) | (tail > 0), "with a non-finite or positive tail")
        if lp is not None and not len(finite) and not len(tail_bad):
            p = np.exp(lp.astype(np.float64))
            total = p.sum(1) + np.exp(tail.astype(np.float64))
            tol = (p * np.expm1(UNIT_ROUNDOFF[attrs["logprob_dtype"]] * np.abs(lp))).sum(1) + MASS_SLACK
            bad(
                "topk_logprobs",
                np.abs(total - 1) > tol,
                f"whose top-k + tail mass is not 1 within the {attrs['logprob_dtype']} rounding bound",
            )
    obs = got.get("observed_logprob")
    if obs is not None:
        obs_bad = bad(
            "observed_logprob",
            ~np.isfinite(obs) | (obs > OBSERVED_SLACK),
            "with a non-finite or positive observed log-prob",
        )
        if targets is not None and ids is not None and lp is not None and not len(finite) and not len(obs_bad):
            u = UNIT_ROUNDOFF[attrs["logprob_dtype"]]
            hit = ids == targets[s0:s1, None]  # (n, k) where the target sits in the row's top-k
            inside = hit.any(1)  # (n,)
            # the target's top-k log-prob, or the k-th one (an upper bound of every log-prob outside the top-k);
            # floored like the stored observed value (the top-k values themselves are not)
            ref = np.maximum(np.where(inside, lp[np.arange(len(lp)), hit.argmax(1)], lp[:, -1]), LOG_FLOOR)  # (n,)
            tol = u * np.abs(ref) + OBSERVED_SLACK  # (n,) the stored log-prob dtype's rounding
            bad(
                "observed_logprob",
                inside & (np.abs(obs - ref) > tol),
                f"whose target is in the top-k but whose log-prob differs from its top-k one beyond the "
                f"{attrs['logprob_dtype']} rounding",
            )
            bad(
                "observed_logprob",
                ~inside & (obs > ref + tol),
                "whose target is outside the top-k but more likely than the k-th token",
            )
    if got.get("hidden") is not None:
        h, logical = got["hidden"], group["hidden"].attrs.get("logical_dtype")
        # int8 stores no NaN: the fill value -128 (a missing chunk) is what no encoder writes
        bad(
            "hidden",
            (h == -128).any(1) if logical == "int8" else ~np.isfinite(decode_float(h, logical)).all(1),
            "with non-finite hidden states" if logical != "int8" else "with the int8 fill value -128 (missing data)",
        )
    if got.get("hidden_scale") is not None:
        sc = got["hidden_scale"]
        bad("hidden_scale", ~np.isfinite(sc) | (sc < 0), "with a non-finite or negative scale")
    return out


def _check_base_contract(path: Path, group, attrs: dict) -> tuple[list[Problem], np.ndarray | None]:
    """(problems of the per-sequence data, (n_rows,) each row's target token input_ids[j+1], or None when the data
    it is derived from has a problem)."""
    out = []
    n_seq, n_tok, n_rows = attrs["n_sequences"], attrs["n_tokens"], attrs["n_rows"]
    got = {n: _read(path, group, n, 0, 0, group[n].shape[0], out) for n in manifest.SEQ_ARRAYS}
    for n in manifest.basis_arrays(attrs):  # the low-rank basis: every row's decoding depends on it
        b = _read(path, group, n, 0, 0, group[n].shape[0], out)
        if b is not None and not np.isfinite(b).all():
            out.append(Problem(n, None, shard_key(n, 0, b.ndim), "non-finite values (missing data)", "contract"))

    def bad(name, cond, what):
        if cond:
            out.append(Problem(name, None, shard_key(name, 0, 1), what, "contract"))
        return cond

    sids = got["sample_ids"]
    if sids is not None:
        bad("sample_ids", len(np.unique(sids)) != n_seq, f"{n_seq - len(np.unique(sids))} duplicate sample ids")
    offs = {}
    for name, n in (("token_offsets", n_tok), ("row_offsets", n_rows)):
        o = got[name]
        if o is not None and not bad(
            name,
            len(o) != n_seq + 1 or o[0] != 0 or o[-1] != n or (np.diff(o) < 0).any(),
            f"not a monotone offset table from 0 to {n}",
        ):
            offs[name] = o
    vocab = attrs.get("provenance", {}).get("tokenizer_size")
    ids = got["input_ids"]
    if ids is not None and len(ids):
        hi = vocab if vocab is not None else np.iinfo(np.int32).max
        n_bad = int(((ids < 0) | (ids >= hi)).sum())
        bad("input_ids", n_bad > 0, f"{n_bad} token ids outside [0, {hi})")
    sup = got["supervised"]
    if sup is not None and not bad("supervised", bool(len(sup)) and sup.max() > 1, "flags other than 0/1"):
        if len(offs) == 2:
            t, r = offs["token_offsets"], offs["row_offsets"]
            per_seq = np.add.reduceat(sup.astype(np.int64), t[:-1]) if len(sup) else np.zeros(n_seq, np.int64)
            per_seq[np.diff(t) == 0] = 0  # reduceat of an empty range returns the next element
            bad("row_offsets", (per_seq != np.diff(r)).any(), "row counts differ from the supervised flags")
            last = t[1:][np.diff(t) > 0] - 1
            bad("supervised", bool(len(last)) and sup[last].any(), "a sequence's last position marked supervised")
    if out or ids is None or sup is None or len(offs) < 2:
        return out, None
    # rows are stored in token order (checked above: counts per sequence, no row at a last position), so row r
    # sits at the r-th supervised position p and predicts input_ids[p + 1]
    return out, ids[np.flatnonzero(sup) + 1]  # (n_rows,)

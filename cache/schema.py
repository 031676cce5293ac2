"""On-disk schema of the otkd teacher cache (Zarr v3), shared by the writer and the reader.

ROW CONTRACT. Row j of a sequence is the teacher's distribution over token j+1 (the token that follows
position j), computed from the full-vocabulary log-softmax at position j. A row is stored for position j iff
token j+1 is supervised (its label is not -100); so the last position never has a row, and a sequence's rows
are its supervised positions in increasing order. Row-axis data is keyed by the content-derived `sample_id`,
never by the row's position in some other dataset.

LAYOUT (one Zarr v3 group, flat token-major arrays, no padding; S sequences, T tokens, R rows):
  sample_ids     (S,)    uint64   64-bit content hash (16 hex chars in the API)
  token_offsets  (S+1,)  int64    sequence i owns tokens [token_offsets[i], token_offsets[i+1])
  row_offsets    (S+1,)  int64    sequence i owns rows   [row_offsets[i],   row_offsets[i+1])
  input_ids      (T,)    int32
  supervised     (T,)    uint8    1 at position j iff a row is stored for j
  topk_ids       (R,k)   int32    rank order (descending probability)
  topk_logprobs  (R,k)   uint16 (bf16 bits) | float16 | float32; attribute logical_dtype says which
  tail_logmass   (R,)    float32  log(1 - sum of the top-k probabilities)
  observed_logprob (R,)  float32  log p(token j+1): full-vocabulary log-softmax at the observed token, >= LOG_FLOOR
  hidden         (R,W)   optional: the final hidden state (lm_head input) at j, in the root attribute
                         `hidden_codec` (cache/codecs.py): bf16 bits (uint16) | float16 | int8 (W = D), or the r
                         bf16 coefficients of a low-rank code (W = r)
  hidden_scale   (R,)    float32, int8 codec only: the row's scale (absmax / 127)
  hidden_mean, hidden_encoder, hidden_decoder
                 (D,), (r,D), (r,D) float32, low-rank codecs only: the basis, written at creation
  shard_done     (n_shards,) uint8, one object per shard: 1 once all row-axis data of that shard is on disk
  manifest/      Zarr groups whose attributes list files, byte sizes and CRC-32 (cache/manifest.py): `base`
                 for what creation wrote, `<s>` for shard s (written after its data, before its shard_done)
Row-axis arrays are sharded by `shard_rows` rows (the unit of writing and of resume). Only spec codecs
(sharding_indexed, bytes, blosc, crc32c) are used so any Zarr v3 reader can open the store; bfloat16 has no
Zarr dtype, hence the uint16 bit pattern plus the `logical_dtype` attribute.
The root attribute `complete` becomes true only after every shard_done record exists.
observed_logprob is the teacher's log-prob of the token that actually follows, in the top-k or not (what a
cross-tokenizer loss multiplies along the observed text; the top-k alone cannot give it); stores of schema 2 and 3
lack it and are read without it.

INTEGRITY (since schema 2; schema 3 added the hidden codecs, schema 4 observed_logprob). Every inner chunk ends
with a crc32c of its compressed bytes (bytes -> blosc -> crc32c; the sharding codec's own crc32c covers only the shard
index), so flipped bits fail on read instead of decoding into other values. Fill values are never data: a chunk that
is missing reads as -1 ids/offsets, NaN log-probs/tail/observed/hidden (-128 int8 hidden), 2 for `supervised`,
2**64-1 for sample ids (Zarr reads absent chunks as the fill value, no error), and every chunk is written even when
it equals the fill value. Shard files are listed in the manifest; `open_cache` stats them, `stages.verify_cache`
hashes and decodes them.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cache import codecs
from cache.errors import CacheError

SCHEMA_VERSION = 4  # 2: chunk crc32c, manifests, fill values that are never data; 3: hidden codecs; 4: observed_logprob
# a version-2 store is a version-3 store with hidden_dtype bf16/fp16/none; a version-3 store is a version-4 store
# without observed_logprob
READABLE_VERSIONS = (2, 3, 4)
OBSERVED_SINCE = 4  # the first schema whose stores hold observed_logprob
FORMAT = "otkd-teacher-cache"
ROW_CONTRACT = "row j = teacher distribution over token j+1; stored iff token j+1 is supervised"
LOG_FLOOR = -80.0
"""The floor of every stored log-prob (tail mass included): exp(-80) ~ 1.8e-35 is "no mass" in float32. Stage 2's
losses clamp teacher log-probs to the same value (pipeline/losses/kl.py keeps its own copy, since the losses import
only torch; tests/test_topk.py checks the two agree), so a tail is read back as the value Stage 1 computed."""

# name -> (stored numpy dtype, codec). bf16 bits compress ~2x better with byte shuffle than fp16 does;
# fp16 does best with bitshuffle (measured on top-k values, Blosc zstd-5: bf16 bit patterns ~3.5-3.9x, fp16 ~2x).
LOGPROB_DTYPES = {
    "bf16": (np.uint16, BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")),
    "fp16": (np.float16, BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")),
    "fp32": (np.float32, BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")),
}
# Hidden states are ~90% of the bytes and near-Gaussian: zstd-5 saves only ~8% over zstd-1 at ~7x the CPU.
# codec kind -> (stored dtype, Blosc codec, logical dtype) of the `hidden` array (cache/codecs.py)
HIDDEN_STORAGE = {
    "bf16": (np.uint16, BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), "bfloat16"),
    "fp16": (np.float16, BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), "float16"),
    # one-byte values: byte shuffle is a no-op; bitshuffle was 1.26x larger at the 7B shape (bench/hidden_bench.py)
    "int8": (np.int8, BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle"), "int8"),
    "low_rank": (np.uint16, BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), "bfloat16"),
}
LOGICAL = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ZSTD5 = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
CHUNK_CHECKSUMS = True  # False only in bench/cache_bench.py, to measure what the per-chunk crc32c costs
# What a missing chunk reads as: values no writer stores (write_rows rejects NaN log-probs/tail/observed, ids < 0).
FILL = {
    "sample_ids": np.iinfo(np.uint64).max,
    "token_offsets": -1,
    "row_offsets": -1,
    "input_ids": -1,
    "supervised": 2,
    "topk_ids": -1,
    "tail_logmass": float("nan"),
    "observed_logprob": float("nan"),
    "shard_done": 0,
}
NAN_FILL = {"bf16": 0x7FC0, "fp16": float("nan"), "fp32": float("nan")}  # bf16 NaN as its uint16 bit pattern
# what a missing `hidden` chunk reads as: NaN, or -128 for int8 (the encoder clamps to [-127, 127])
HIDDEN_FILL = {"bfloat16": 0x7FC0, "float16": float("nan"), "int8": -128}

# Beside the split stores, in the cache folder (Stage 1 writes them; a cross-tokenizer Stage 2 reads them): the
# teacher's tokenizer (checked against each store's provenance tokenizer_hash) and its input-embedding rows of every
# id in a cached top-k (safetensors: "ids" (n,) int64, "weight" (n, D) float32).
TOKENIZER_DIR = "tokenizer"
EMBEDDINGS_FILE = "teacher_embeddings.safetensors"

ROW_ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass", "observed_logprob", "hidden", "hidden_scale")
# what read() returns
FIELDS = ("input_ids", "supervised", "topk_ids", "topk_logprobs", "tail_logmass", "observed_logprob", "hidden")
BASIS_ARRAYS = ("hidden_mean", "hidden_encoder", "hidden_decoder")
# Token-axis and per-sequence arrays are written once; 16k-element chunks keep a per-sequence read small.
SEQ_CHUNK, SEQ_SHARD = 16384, 1 << 20
# Inner-chunk targets: ~1 MB reads for ids/log-probs (4096 rows at k=64), ~2 MB for hidden (256 rows at 3584).
ROW_CHUNK_BYTES, HIDDEN_CHUNK_BYTES = 1 << 20, 2 << 20


def sid_to_u64(sid: str) -> int:
    if not (isinstance(sid, str) and len(sid) == 16):
        raise ValueError(f"sample_id must be 16 hex characters, got {sid!r}")
    return int(sid, 16)


def u64_to_sid(v) -> str:
    return f"{int(v):016x}"


def to_numpy(x) -> np.ndarray:
    """numpy view of a torch tensor (any device) or array; bfloat16 tensors become their uint16 bit pattern."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    return np.asarray(x)


def encode_float(x, name: str) -> np.ndarray:
    """Array or tensor -> stored representation of dtype `name` ("bf16" = uint16 bits, "fp16", "fp32").

    A torch bfloat16 input is taken bit for bit when the target is bf16 (no round trip through float32);
    float32 -> bf16 rounds to nearest even, as torch does.
    """
    if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
        if name == "bf16":
            return to_numpy(x)
        x = x.float()  # bf16 -> fp32 is exact; fp16/fp32 rounding then happens once
    if name == "bf16":
        t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        return to_numpy(t.to(torch.bfloat16))
    return to_numpy(x).astype(LOGPROB_DTYPES[name][0], copy=False)


def decode_float(a: np.ndarray, logical: str) -> np.ndarray:
    """Stored array -> float32; bf16 bits are widened exactly (they are the high half of a float32)."""
    if logical == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def canonical(obj):
    """JSON-normal form (sorted keys, lists, plain numbers) so requested and stored values compare equal.

    Stored attributes went through JSON; passing the requested ones through the same round trip makes
    tuples/lists, int/np.int64, Path/str and dict key order irrelevant to the comparison.
    """

    def plain(o):
        if isinstance(o, dict):
            return {str(k): plain(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [plain(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return o

    return json.loads(json.dumps(plain(obj), sort_keys=True))


def first_difference(a, b, prefix: str = ""):
    """(dotted field name, a value, b value) of the first difference between two canonical values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{prefix}{key}", a.get(key, "<missing>"), b.get(key, "<missing>")
            d = first_difference(a[key], b[key], f"{prefix}{key}.")
            if d:
                return d
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def make_plan(
    sample_ids_u64,
    token_offsets,
    row_offsets,
    input_ids,
    supervised,
    *,
    k,
    logprob_dtype,
    hidden_codec,
    hidden_size,
    shard_rows,
    basis_arrays=None,
) -> dict:
    """What fixes the row layout: resuming is only sound if every entry matches (ordered for error messages)."""
    return canonical(
        {
            "n_sequences": len(sample_ids_u64),
            "n_tokens": int(token_offsets[-1]),
            "n_rows": int(row_offsets[-1]),
            "k": k,
            "logprob_dtype": logprob_dtype,
            "hidden_codec": hidden_codec,
            "hidden_size": hidden_size,
            "shard_rows": shard_rows,
            # a low-rank basis fitted again after a crash may differ in the last bits: rows encoded with another
            # basis must never be mixed into one store
            "hidden_basis_sha": _digest(*basis_arrays.values()) if basis_arrays else None,
            "sample_ids_sha": _digest(sample_ids_u64),  # order matters: rows are laid out in this order
            "offsets_sha": _digest(token_offsets, row_offsets),
            "tokens_sha": _digest(input_ids, supervised),
        }
    )


def canonical_meta(attrs: dict) -> dict:
    """A store's (or a request's) identity in comparable form: schema version, plan and provenance."""
    return canonical(
        {
            "schema_version": attrs.get("schema_version"),
            "plan": attrs.get("plan", {}),
            "provenance": attrs.get("provenance", {}),
        }
    )


def read_root_attrs(path: Path) -> dict:
    """Root attributes of an otkd cache, or CacheError if `path` holds something else (writer and reader)."""
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception as e:  # no zarr.json, unreadable JSON, an array instead of a group, ...
        raise CacheError(
            f"{path} exists but is not an otkd teacher cache ({type(e).__name__}); delete it or choose another path"
        ) from None
    if attrs.get("format") != FORMAT:
        raise CacheError(
            f"{path} is a Zarr group but not an otkd teacher cache (no format={FORMAT!r} "
            "attribute); delete it or choose another path"
        )
    if attrs.get("schema_version") not in READABLE_VERSIONS:
        raise CacheError(
            f"{path} has cache schema version {attrs.get('schema_version')!r}, this code reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}; recreate the cache with this version "
            "of otkd"
        )
    return attrs


def has_observed(attrs: dict) -> bool:
    """Whether a store holds observed_logprob: decided by its schema version, not by what is on disk, so a schema-4
    store whose array went missing fails the manifest check instead of reading as an old store."""
    return attrs.get("schema_version", 0) >= OBSERVED_SINCE


def hidden_codec(attrs: dict) -> str | None:
    """The store's hidden codec ("bf16", "int8", "pca:64", ...) or None (no hidden states); schema 2 says
    hidden_dtype (bf16, fp16 or None), which is the same layout."""
    return attrs.get("hidden_codec", attrs.get("hidden_dtype"))


def short_repr(v) -> str:
    """repr(v) cut to 60 characters, for values quoted in one-line error messages."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _largest_divisor_at_most(n: int, cap: int) -> int:
    """Inner chunks must tile a shard exactly, and shard_rows need not be a power of two."""
    cap = max(1, min(n, cap))
    best = 1
    for d in range(1, int(n**0.5) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= cap:
                    best = c
    return best


def read_basis(group, attrs: dict) -> "codecs.Basis | None":
    """The low-rank basis stored in an open store, or None for the other codecs."""
    codec = hidden_codec(attrs)
    if not (codec and codecs.parse(codec)[1]):
        return None
    return codecs.Basis(*(group[n][...] for n in BASIS_ARRAYS))


def array_specs(
    n_seq: int,
    n_tok: int,
    n_rows: int,
    *,
    k: int,
    logprob_dtype: str,
    hidden_codec,
    hidden_size,
    shard_rows: int,
    observed: bool = True,
) -> dict:
    """name -> keyword arguments of zarr.create_array (minus store/name) for every array of the layout.
    observed=False: the layout of a store older than schema 4 (no observed_logprob), for repairing its metadata."""
    crc = [Crc32cCodec()] if CHUNK_CHECKSUMS else []

    def seq(n, dtype):
        return dict(shape=(n,), dtype=dtype, chunks=(SEQ_CHUNK,), shards=(SEQ_SHARD,), compressors=[ZSTD5, *crc])

    def rows(width, dtype, codec, target_bytes, logical=None):
        row_bytes = np.dtype(dtype).itemsize * (width or 1)
        inner = _largest_divisor_at_most(shard_rows, target_bytes // row_bytes)
        tail = (width,) if width else ()
        attrs = {"logical_dtype": logical} if logical else {}
        return dict(
            shape=(n_rows,) + tail,
            dtype=dtype,
            chunks=(inner,) + tail,
            shards=(shard_rows,) + tail,
            compressors=[codec, *crc],
            attributes={"axis": "row", **attrs},
        )

    lp_dtype, lp_codec = LOGPROB_DTYPES[logprob_dtype]
    specs = {
        "sample_ids": seq(n_seq, np.uint64),
        "token_offsets": seq(n_seq + 1, np.int64),
        "row_offsets": seq(n_seq + 1, np.int64),
        "input_ids": seq(n_tok, np.int32),
        "supervised": seq(n_tok, np.uint8),
        "topk_ids": rows(k, np.int32, ZSTD5, ROW_CHUNK_BYTES),
        "topk_logprobs": rows(k, lp_dtype, lp_codec, ROW_CHUNK_BYTES, LOGICAL[logprob_dtype]),
        "tail_logmass": rows(None, np.float32, ZSTD5, ROW_CHUNK_BYTES // 16, "float32"),
        # one small object per shard: writing it is the atomic "this shard is complete" record
        "shard_done": dict(shape=(n_shards(n_rows, shard_rows),), dtype=np.uint8, chunks=(1,), compressors=crc),
    }
    if observed:  # exact float32 like the tail: it is compared with top-k log-probs and multiplied along the text
        specs["observed_logprob"] = rows(None, np.float32, ZSTD5, ROW_CHUNK_BYTES // 16, "float32")
    if hidden_codec is not None:
        kind, r = codecs.parse(hidden_codec)
        h_dtype, h_codec, logical = HIDDEN_STORAGE["low_rank" if r else kind]
        specs["hidden"] = rows(
            codecs.stored_width(hidden_codec, hidden_size), h_dtype, h_codec, HIDDEN_CHUNK_BYTES, logical
        )
        specs["hidden"]["fill_value"] = HIDDEN_FILL[logical]
        if kind == "int8":
            specs["hidden_scale"] = rows(None, np.float32, ZSTD5, ROW_CHUNK_BYTES // 16, "float32")
            specs["hidden_scale"]["fill_value"] = float("nan")
        if r:  # the basis: small, one chunk each, written at creation like the per-sequence arrays
            for name, shape in (
                ("hidden_mean", (hidden_size,)),
                ("hidden_encoder", (r, hidden_size)),
                ("hidden_decoder", (r, hidden_size)),
            ):
                specs[name] = dict(
                    shape=shape, dtype=np.float32, chunks=shape, compressors=[ZSTD5, *crc], fill_value=float("nan")
                )
    specs["topk_logprobs"]["fill_value"] = NAN_FILL[logprob_dtype]
    for name, fill in FILL.items():
        if name in specs:
            specs[name]["fill_value"] = fill
    return specs


def n_shards(n_rows: int, shard_rows: int) -> int:
    return -(-n_rows // shard_rows)


def shard_key(name: str, s: int, ndim: int) -> str:
    """Store key (path inside the store) of shard s of array `name` (default chunk-key encoding, "/")."""
    return f"{name}/c/{s}" + "/0" * (ndim - 1)

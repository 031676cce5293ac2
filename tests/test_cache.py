"""Teacher cache: round trips at awkward sizes, plain-zarr readability, crash/resume bit-identity, refusals."""

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache import CacheDataset, CacheError, CacheMismatchError, describe, open_cache
from cache.schema import canonical_meta
from tests.conftest import PROV, SHARD, D, K, create, make_inputs, make_rows, write_all

REPO = Path(__file__).resolve().parents[1]


def snapshot(path) -> dict:
    """Every file of a store with its bytes: 'bit-identical' means these dicts are equal."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def stored(x, dtype):
    """What a value becomes in the given stored dtype, as float32."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]).float().numpy()


@pytest.mark.parametrize(
    "lp_dtype,h_dtype,bf16_input",
    [("bf16", "bf16", True), ("bf16", "fp16", False), ("fp16", None, False), ("fp32", "bf16", False)],
)
def test_roundtrip_exact(tmp_path, lp_dtype, h_dtype, bf16_input):
    inputs = make_inputs()
    w = create(
        tmp_path / "c.zarr", inputs, logprob_dtype=lp_dtype, hidden_codec=h_dtype, hidden_size=D if h_dtype else None
    )
    assert w.n_shards == -(-w.n_rows // SHARD) >= 3  # several shards, last one partial
    ids, lp, tail, hid, obs = make_rows(w.n_rows)
    if bf16_input:  # what a bf16 teacher hands over: must be stored bit for bit
        lp, hid = lp.bfloat16(), hid.bfloat16()
    with w:
        write_all(w, (ids, lp, tail, hid if h_dtype else None, obs), step=range(0, w.n_rows, 7))
    c = open_cache(tmp_path / "c.zarr")
    assert len(c) == 7 and c.k == K and c.provenance == PROV and c.sample_ids == inputs["sample_ids"]
    assert c.has_hidden == (h_dtype is not None) and c.has_observed
    r0 = 0
    for i in range(7):
        got = c.read(i)
        n = int(inputs["supervised_per_seq"][i].sum())
        assert got["sample_id"] == inputs["sample_ids"][i] and c.index_of(got["sample_id"]) == i
        np.testing.assert_array_equal(got["input_ids"], inputs["input_ids_per_seq"][i])
        np.testing.assert_array_equal(got["supervised"], inputs["supervised_per_seq"][i])
        np.testing.assert_array_equal(got["topk_ids"], ids[r0 : r0 + n].numpy())
        np.testing.assert_array_equal(got["topk_logprobs"], stored(lp[r0 : r0 + n], lp_dtype))
        np.testing.assert_array_equal(got["tail_logmass"], tail[r0 : r0 + n].numpy())
        np.testing.assert_array_equal(got["observed_logprob"], obs[r0 : r0 + n].numpy())  # exact float32
        assert got["observed_logprob"].dtype == np.float32
        if h_dtype:
            np.testing.assert_array_equal(got["hidden"], stored(hid[r0 : r0 + n], h_dtype))
        else:
            assert "hidden" not in got
        assert got["topk_logprobs"].dtype == np.float32 and got["topk_ids"].dtype == np.int64
        r0 += n
    assert r0 == w.n_rows
    if bf16_input:  # exact bits, not merely equal floats
        got = np.concatenate([c.read(i)["topk_logprobs"] for i in range(7)])
        np.testing.assert_array_equal(got.view(np.uint32) >> 16, lp.view(torch.int16).numpy().view(np.uint16))


def test_plain_zarr_reads_store(tmp_path):
    inputs = make_inputs()
    w = create(tmp_path / "c.zarr", inputs)
    rows = make_rows(w.n_rows)
    with w:
        write_all(w, rows)
    g = zarr.open_group(tmp_path / "c.zarr", mode="r")  # no otkd code involved below
    a = g.attrs.asdict()
    assert a["complete"] is True and a["k"] == K and a["n_rows"] == w.n_rows and a["provenance"] == PROV
    assert a["logprob_dtype"] == "bf16" and a["hidden_codec"] == "bf16" and a["hidden_size"] == D
    assert a["n_sequences"] == 7 and a["n_tokens"] == sum(map(len, inputs["input_ids_per_seq"]))
    np.testing.assert_array_equal(g["input_ids"][:], np.concatenate(inputs["input_ids_per_seq"]))
    np.testing.assert_array_equal(g["sample_ids"][:], [int(s, 16) for s in inputs["sample_ids"]])
    np.testing.assert_array_equal(g["topk_ids"][:], rows[0].numpy())
    assert g["topk_logprobs"].dtype == np.uint16 and g["topk_logprobs"].attrs["logical_dtype"] == "bfloat16"
    np.testing.assert_array_equal(g["topk_logprobs"][:], rows[1].bfloat16().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(g["tail_logmass"][:], rows[2].numpy())
    np.testing.assert_array_equal(g["observed_logprob"][:], rows[4].numpy())
    assert a["schema_version"] == 4 and np.isnan(g["observed_logprob"].fill_value)
    offs = g["row_offsets"][:]
    assert offs[-1] == w.n_rows and (np.diff(offs) == [m.sum() for m in inputs["supervised_per_seq"]]).all()
    codecs = g["topk_ids"].metadata.to_dict()["codecs"]
    assert codecs[0]["name"] == "sharding_indexed" and codecs[0]["configuration"]["codecs"][1]["name"] == "blosc"
    assert g["shard_done"][:].all()


def test_many_small_writes_equal_one_write(tmp_path):
    w1, w2 = create(tmp_path / "a.zarr"), create(tmp_path / "b.zarr", background=False)  # both modes
    rows = make_rows(w1.n_rows)
    with w1:
        write_all(w1, rows)
    with w2:  # uneven pieces, incl. empty ones and pieces straddling shard boundaries
        write_all(w2, rows, step=[1, 1, 2, 15, 16, 17, 30, 33, 33, 47])
    assert snapshot(tmp_path / "a.zarr") == snapshot(tmp_path / "b.zarr")
    assert describe(tmp_path / "a.zarr") == describe(tmp_path / "b.zarr")
    assert describe(tmp_path / "a.zarr")["provenance"] == PROV


def test_interrupted_store_refused_then_resumes_bit_identical(tmp_path):
    ref = create(tmp_path / "ref.zarr")
    rows = make_rows(ref.n_rows)
    with ref:
        write_all(ref, rows)
    w = create(tmp_path / "c.zarr")
    with pytest.raises(RuntimeError):
        with w:  # "crash" after 1.5 shards: shard 0 flushed, half of shard 1 only buffered
            write_all(w, tuple(x[:24] for x in rows), step=[10, 20])
            raise RuntimeError("killed")
    with pytest.raises(CacheError, match=r"incomplete teacher cache .*1/3 shards .*stages.cache_teacher"):
        open_cache(tmp_path / "c.zarr")
    # debris a SIGKILL could leave: a LocalStore temp file, a garbage object in an incomplete shard
    (tmp_path / "c.zarr/topk_ids/c/0.0123456789abcdef0123456789abcdef.partial").write_bytes(b"x")
    (tmp_path / "c.zarr/hidden/c/1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "c.zarr/hidden/c/1/0").write_bytes(b"garbage")
    w = create(tmp_path / "c.zarr")
    assert w.resumed and not w.complete and w.shards_done == 1 and w.rows_todo() == SHARD
    assert w.is_row_range_done(0, SHARD) and not w.is_row_range_done(SHARD - 1, SHARD + 1)
    with w:  # replays from a batch that starts inside a completed shard: those rows are dropped
        write_all(w, rows, step=range(0, w.n_rows, 10))
    assert snapshot(tmp_path / "c.zarr") == snapshot(tmp_path / "ref.zarr")
    again = create(tmp_path / "c.zarr")
    assert again.complete and again.rows_todo() == again.n_rows  # nothing to do
    with again:
        write_all(again, rows)  # dropped: every shard is complete
    assert snapshot(tmp_path / "c.zarr") == snapshot(tmp_path / "ref.zarr")


def test_normal_close_of_partial_write_is_not_complete(tmp_path):
    w = create(tmp_path / "c.zarr")
    rows = make_rows(w.n_rows)
    with pytest.warns(UserWarning, match="buffered rows of shard 1 dropped"):
        with w:  # a caller that stops early without an error: finished shards stay, nothing is marked complete
            write_all(w, tuple(x[:20] for x in rows))
    assert not w.complete
    with pytest.raises(CacheError, match=r"incomplete .*\(1/3 shards"):
        open_cache(tmp_path / "c.zarr")


def test_all_records_but_no_complete_flag(tmp_path):
    """Killed between the last shard record and the root attribute: refused, then finished by a no-op rerun."""
    w = create(tmp_path / "c.zarr", background=False)
    rows = make_rows(w.n_rows)
    write_all(w, rows)  # no close(): every shard_done record exists, `complete` is still false
    with pytest.raises(CacheError, match=r"incomplete .*\(3/3 shards"):
        open_cache(tmp_path / "c.zarr")
    w = create(tmp_path / "c.zarr")
    assert not w.complete and w.is_row_range_done(0, w.n_rows)
    assert w.close() and len(open_cache(tmp_path / "c.zarr")) == 7


CHILD = """
import os, signal, sys, numpy as np, torch, zarr
sys.path.insert(0, {repo!r})
from tests.conftest import create, make_rows, write_all
calls = [0]
orig = zarr.Array.__setitem__
def setitem(self, key, value):
    calls[0] += 1
    if calls[0] == {kill_at}:  # dies inside shard 1: some of its arrays written, no record
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, key, value)
w = create({path!r})
zarr.Array.__setitem__ = setitem
with w:
    write_all(w, make_rows(w.n_rows), step=range(0, w.n_rows, 5))
"""


def test_sigkill_then_resume_bit_identical(tmp_path):
    ref = create(tmp_path / "ref.zarr")
    rows = make_rows(ref.n_rows)
    with ref:
        write_all(ref, rows)
    path = str(tmp_path / "c.zarr")
    # per shard: 5 row arrays + 1 record = 6 setitems; call 8 is the 2nd array of shard 1
    code = CHILD.format(repo=str(REPO), kill_at=8, path=path)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(path)
    w = create(path)
    assert w.shards_done == 1 and w.rows_todo() == SHARD
    with w:
        write_all(w, rows, step=range(0, w.n_rows, 10))
    assert snapshot(path) == snapshot(tmp_path / "ref.zarr")


def test_mismatch_refused_naming_field(tmp_path):
    path = tmp_path / "c.zarr"
    w = create(path)
    with w:
        write_all(w, make_rows(w.n_rows))
    with pytest.raises(
        CacheMismatchError,
        match=r"another teacher \(provenance.teacher_hash: stored 'a1b2' "
        r"!= requested 'c3d4'\); delete it",
    ):
        create(path, provenance={**PROV, "teacher_hash": "c3d4"})
    with pytest.raises(CacheMismatchError, match=r"plan.k: stored 5 != requested 4"):
        create(path, k=4)
    with pytest.raises(CacheMismatchError, match=r"plan.shard_rows"):
        create(path, shard_rows=32)
    inp = make_inputs()
    swapped = {key: v[1:2] + v[:1] + v[2:] for key, v in inp.items()}  # same data, other order
    with pytest.raises(CacheMismatchError, match=r"plan\.(sample_ids_sha|offsets_sha)"):
        create(path, swapped)
    other_tokens = dict(inp, input_ids_per_seq=[x + 1 for x in inp["input_ids_per_seq"]])
    with pytest.raises(CacheMismatchError, match=r"plan.tokens_sha"):
        create(path, other_tokens)
    # the reader's `expect`: names the key and both values
    with pytest.raises(CacheMismatchError, match=r"teacher_hash='a1b2' but teacher_hash='zz' is expected"):
        open_cache(path, expect={"teacher_hash": "zz"})
    with pytest.raises(CacheMismatchError, match=r"k=5 but k=8"):
        open_cache(path, expect={"k": 8})
    assert len(open_cache(path, expect={"teacher_hash": "a1b2", "k": 5, "params": {"k": K}})) == 7
    # canonical form: key order, tuples and numpy ints do not matter
    assert canonical_meta({"provenance": {"b": (1, 2), "a": np.int64(3)}}) == canonical_meta(
        {"provenance": {"a": 3, "b": [1, 2]}}
    )


def test_not_a_cache_and_missing_refused(tmp_path):
    with pytest.raises(CacheError, match=r"no teacher cache at .* run `python -m stages.cache_teacher` first"):
        open_cache(tmp_path / "nope.zarr")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(CacheError, match="not an otkd teacher cache"):
        create(junk)
    with pytest.raises(CacheError, match="not an otkd teacher cache"):
        open_cache(junk)
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"x": 1})
    with pytest.raises(CacheError, match="not an otkd teacher cache"):
        create(tmp_path / "other.zarr")
    assert (junk / "notes.txt").read_text() == "hello"  # refused, not overwritten
    w = create(tmp_path / "v.zarr")
    zarr.open_group(tmp_path / "v.zarr", mode="r+").attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        open_cache(tmp_path / "v.zarr")
    del w


def test_bad_writes_rejected(tmp_path):
    with pytest.raises(ValueError, match="last position marked supervised"):
        create(
            tmp_path / "a.zarr",
            dict(make_inputs(), supervised_per_seq=[np.ones(n, bool) for n in (5, 9, 1, 12, 7, 20, 4)]),
        )
    w = create(tmp_path / "b.zarr")
    ids, lp, tail, hid, obs = make_rows(w.n_rows)
    with pytest.raises(ValueError, match="inside incomplete shard"):
        w.write_rows(3, ids[3:8], lp[3:8], tail[3:8], hid[3:8], observed=obs[3:8])
    w.write_rows(0, ids[:4], lp[:4], tail[:4], hid[:4], observed=obs[:4])
    with pytest.raises(ValueError, match="contiguous"):
        w.write_rows(5, ids[5:8], lp[5:8], tail[5:8], hid[5:8], observed=obs[5:8])
    bad = lp[4:8].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        w.write_rows(4, ids[4:8], bad, tail[4:8], hid[4:8], observed=obs[4:8])
    with pytest.raises(ValueError, match="hidden"):
        w.write_rows(4, ids[4:8], lp[4:8], tail[4:8], None, observed=obs[4:8])
    with pytest.raises(ValueError, match="stores observed_logprob: pass observed="):
        w.write_rows(4, ids[4:8], lp[4:8], tail[4:8], hid[4:8])
    bad = obs[4:8].clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN in teacher log-probs, tail or observed log-prob, rows 4..8"):
        w.write_rows(4, ids[4:8], lp[4:8], tail[4:8], hid[4:8], observed=bad)
    with pytest.raises(ValueError, match=r"observed_logprob has shape \(3,\), expected \(4,\)"):
        w.write_rows(4, ids[4:8], lp[4:8], tail[4:8], hid[4:8], observed=obs[4:7])


def test_failed_background_write_surfaces_and_records_nothing(tmp_path, monkeypatch):
    w = create(tmp_path / "c.zarr")
    rows = make_rows(w.n_rows)

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(w, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        with w:
            write_all(w, rows, step=range(0, w.n_rows, 4))
    assert w.shards_done == 0 and not zarr.open_group(tmp_path / "c.zarr", mode="r")["shard_done"][:].any()


def test_dataset_lazy_fields_and_workers(tmp_path):
    w = create(tmp_path / "c.zarr")
    with w:
        write_all(w, make_rows(w.n_rows))
    c = open_cache(tmp_path / "c.zarr")
    ds = CacheDataset(c, fields=["input_ids", "topk_logprobs"])
    assert set(ds[3]) == {"index", "sample_id", "input_ids", "topk_logprobs"}
    with pytest.raises(KeyError, match="nope"):
        CacheDataset(c, fields=["nope"])
    full = CacheDataset(tmp_path / "c.zarr")
    dl = torch.utils.data.DataLoader(full, batch_size=3, num_workers=2, collate_fn=lambda b: b)
    got = [item for batch in dl for item in batch]
    assert [g["index"] for g in got] == list(range(7))
    for g in got:
        ref = c.read(g["index"])
        for key in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "observed_logprob", "hidden"):
            np.testing.assert_array_equal(g[key], ref[key])


def as_schema_3(path) -> None:
    """Rewrite a written store into what schema 3 wrote: no observed_logprob array, version 3, manifests without it."""
    from cache import manifest

    g = zarr.open_group(path, mode="r+")
    g.attrs["schema_version"] = 3
    shutil.rmtree(Path(path) / "observed_logprob")
    attrs = g.attrs.asdict()
    manifest.write_manifest(path, manifest.BASE, manifest.make_base_manifest(path, attrs))
    for s in range(attrs["n_shards"]):
        manifest.write_manifest(path, s, manifest.make_shard_manifest(path, attrs, s))


def test_a_schema_3_store_still_reads_without_observed(tmp_path):
    path = tmp_path / "c.zarr"
    w = create(path)
    with w:
        write_all(w, make_rows(w.n_rows))
    before = open_cache(path).read_many(range(7))
    as_schema_3(path)
    assert "observed_logprob" not in zarr.open_group(path, mode="r")
    c = open_cache(path)  # every listed file is there: the manifests of schema 3 do not list observed_logprob
    assert not c.has_observed and c.has_hidden
    for x, y in zip(c.read_many(range(7)), before):  # every field it has, as before; no observed_logprob
        assert set(x) == set(y) - {"observed_logprob"}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    for ask in (lambda: c.read(0, ["input_ids", "observed_logprob"]), lambda: CacheDataset(c, ["observed_logprob"])):
        with pytest.raises(CacheMismatchError, match=r"schema 3, which predates observed_logprob \(schema 4\)") as e:
            ask()
        assert "python -m stages.cache_teacher" in str(e.value) and "\n" not in str(e.value)
    # Stage 1 never resumes (nor accepts as done) a store without the array: it must be made again
    with pytest.raises(CacheMismatchError, match="holds a cache of schema 3, older than the schema 4"):
        create(path)

"""Cache integrity: faults injected for real into written stores are detected at open or read with a one-line
message (never read as fill values), `stages.verify_cache` finds each (exit 1), and --repair + a Stage-1
style resume restores the store bit for bit."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cache import CacheError, manifest, open_cache
from cache.errors import CacheCorruptError
from cache.schema import LOG_FLOOR
from stages.verify_cache import app
from tests.conftest import PROV, K, create, make_inputs, row_targets, write_all

V = 1000  # the tokenizer size the stores record; make_rows-style ids are drawn below it
PROV_V = {**PROV, "tokenizer_size": V}
STAGE1 = "python -m stages.cache_teacher"


def contract_rows(targets, seed=1, vocab=V):
    """Rows that satisfy the row contract for these (R,) target tokens: top-k of a real log-softmax, exact tail,
    distinct ids < vocab, the target's log-prob; every other row's target is made likely, so that both cases of the
    observed log-prob (in the top-k or not) occur."""
    n_rows = len(targets)
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n_rows, vocab, generator=g)  # (R, V)
    t = torch.as_tensor(targets, dtype=torch.long)  # (R,)
    even = torch.arange(0, n_rows, 2)
    logits[even, t[even]] += 12.0
    lsm = torch.log_softmax(logits, -1)
    lp, ids = lsm.topk(K, -1)
    rest = lsm.scatter(1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    hidden = torch.randn(n_rows, 13, generator=g)
    observed = lsm.gather(1, t[:, None])[:, 0].clamp_min(LOG_FLOOR)  # (R,)
    return ids, lp, tail, hidden, observed


def write_store(path, provenance=PROV_V, rows=None):
    w = create(path, provenance=provenance)
    rows = contract_rows(row_targets(make_inputs())) if rows is None else rows
    with w:
        write_all(w, rows, step=range(0, w.n_rows, 7))
    return rows


def snapshot(path) -> dict:
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    rows = write_store(path)
    return path, rows, snapshot(path)


@pytest.fixture
def store(tmp_path, reference):
    path = tmp_path / "c.zarr"
    shutil.copytree(reference[0], path)
    return path


def verify(path, *args):
    r = CliRunner().invoke(app, [str(path), "--no-progress", *args])
    assert r.exit_code in (0, 1), (r.output, r.exception)
    return r.exit_code, r.output


def flip(path, rel, at=0.3):
    """Flip one bit inside the compressed chunk data (the shard index sits at the end of the file)."""
    f = Path(path) / rel
    b = bytearray(f.read_bytes())
    b[int(len(b) * at)] ^= 0x10
    f.write_bytes(bytes(b))


def read_everything(path):
    c = open_cache(path)
    return c.read_many(range(len(c)))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def test_clean_store_is_clean(store):
    code, out = verify(store)
    assert code == 0 and "result: CLEAN" in out and "contract  OK" in out
    code, out = verify(store, "--quick")
    assert code == 0 and "not checked (--quick)" in out
    g = zarr.open_group(store, mode="r")  # manifests are plain Zarr groups
    m = g["manifest/1"].attrs.asdict()
    assert (
        m["shard"] == 1
        and m["rows"] == [16, 32]
        and {e["file"] for e in m["files"]}
        == {"topk_ids/c/1/0", "topk_logprobs/c/1/0", "tail_logmass/c/1", "observed_logprob/c/1", "hidden/c/1/0"}
    )
    assert all(e["bytes"] == (store / e["file"]).stat().st_size for e in m["files"])
    assert g["topk_ids"].fill_value == -1 and np.isnan(g["tail_logmass"].fill_value)
    assert np.isnan(g["observed_logprob"].fill_value)


# fault -> (inject(path), regex of the one-line error at open (CacheError) or on reading everything)
FILE_FAULTS = {
    "deleted shard file": (
        lambda p: (p / "topk_ids/c/1/0").unlink(),
        r"incomplete teacher cache .*: topk_ids shard 1 \(file topk_ids/c/1/0\): file missing",
    ),
    "truncated shard": (
        lambda p: (p / "hidden/c/2/0").write_bytes((p / "hidden/c/2/0").read_bytes()[:-9]),
        r"incomplete teacher cache .*: hidden shard 2 \(file hidden/c/2/0\): \d+ bytes, manifest says",
    ),
    "deleted manifest": (
        lambda p: (p / "manifest/1/zarr.json").unlink(),
        r"incomplete .*manifest shard 1 \(file manifest/1/zarr.json\): completion record without",
    ),
    "deleted token file": (
        lambda p: (p / "input_ids/c/0").unlink(),
        r"incomplete .*input_ids per-sequence data \(file input_ids/c/0\): file missing",
    ),
}
FLIPS = {
    "topk_ids": "topk_ids/c/1/0",
    "topk_logprobs": "topk_logprobs/c/0/0",
    "tail_logmass": "tail_logmass/c/2",
    "observed_logprob": "observed_logprob/c/1",
    "hidden": "hidden/c/1/0",
    "input_ids": "input_ids/c/0",
    "supervised": "supervised/c/0",
    "sample_ids": "sample_ids/c/0",
    "row_offsets": "row_offsets/c/0",
}


@pytest.mark.parametrize("fault", FILE_FAULTS)
def test_missing_or_truncated_files_refused_at_open(store, fault):
    inject, pattern = FILE_FAULTS[fault]
    inject(store)
    with pytest.raises(CacheError, match=pattern) as e:
        open_cache(store)
    assert f"rerun `{STAGE1}`" in one_line(e)
    code, out = verify(store, "--quick")
    assert code == 1 and "PROBLEMS (" in out
    assert verify(store)[0] == 1


@pytest.mark.parametrize("array", FLIPS)
def test_flipped_bytes_fail_on_read_naming_the_shard(store, array):
    flip(store, FLIPS[array])
    with pytest.raises(CacheCorruptError) as e:
        read_everything(store)  # the per-sequence arrays fail already inside open_cache
    msg = one_line(e)
    shard = FLIPS[array].split("/")[2]
    assert f"{array} shard {shard} (file {FLIPS[array]}) fails its crc32c checksum" in msg
    assert f"python -m stages.verify_cache {store} --repair" in msg and STAGE1 in msg
    code, out = verify(store)
    assert code == 1 and f"(file {FLIPS[array]}): crc32 " in out and "fails its crc32c checksum" in out


def test_truncation_after_open_fails_on_read(store):
    c = open_cache(store)
    f = store / "topk_logprobs/c/1/0"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CacheCorruptError, match=r"topk_logprobs shard 1 \(file topk_logprobs/c/1/0\) fails") as e:
        c.read_many(range(len(c)))
    one_line(e)


def test_out_of_range_ids_fail_on_read(tmp_path):
    path = tmp_path / "c.zarr"
    inputs = make_inputs()
    inputs["input_ids_per_seq"] = [x % 900 for x in inputs["input_ids_per_seq"]]  # the tokens are in range
    w = create(path, inputs, provenance={**PROV, "tokenizer_size": 900})
    ids, lp, tail, hid, obs = contract_rows(row_targets(inputs), vocab=V)  # ids up to 999; the store says 900
    ids[20, 0] = 950
    with w:
        write_all(w, (ids, lp, tail, hid, obs))
    c = open_cache(path)
    with pytest.raises(
        CacheCorruptError,
        match=r"topk_ids shard \d \(file topk_ids/c/\d/0\) holds id 9\d\d "
        r"outside \[0, 900\)",
    ) as e:
        c.read_many(range(len(c)))
    one_line(e)
    code, out = verify(path)
    assert code == 1 and "with ids outside [0, 900)" in out and "contract  " in out


def test_verify_contract_checks(store):
    """Values rewritten through Zarr itself (valid checksums, manifest updated): only the contract finds them."""
    from cache import manifest

    g = zarr.open_group(store, mode="r+")
    attrs = g.attrs.asdict()
    ids = g["topk_ids"][16:32]
    ids[3, 1] = ids[3, 0]  # a repeated id
    g["topk_ids"][16:32] = ids
    tail = g["tail_logmass"][0:16]
    tail[5] += 1.0  # mass no longer sums to 1
    g["tail_logmass"][0:16] = tail
    for s in (0, 1):
        manifest.write_manifest(store, s, manifest.make_shard_manifest(store, attrs, s))
    code, out = verify(store)
    assert code == 1 and "1 row(s) with repeated ids (first: row 19)" in out
    assert "1 row(s) whose top-k + tail mass is not 1 within the bf16 rounding bound (first: row 5)" in out
    assert "files     OK" in out and "chunks    OK" in out


def rewrite_rows(path, name: str, s: int, change) -> None:
    """Shard s of row array `name` rewritten through Zarr (valid checksums) with its manifest updated: only the
    row contract can find what `change(values)` (in place) did."""
    g = zarr.open_group(path, mode="r+")
    attrs = g.attrs.asdict()
    s0, s1 = manifest.shard_rows(attrs, s)
    values = g[name][s0:s1]
    change(values)
    g[name][s0:s1] = values
    manifest.write_manifest(path, s, manifest.make_shard_manifest(path, attrs, s))


def test_verify_observed_logprob_checks(store, reference):
    """Observed log-probs that are positive, or disagree with the row's top-k, are contract problems."""
    _, (ids, lp, _, _, _), _ = reference
    targets = torch.as_tensor(row_targets(make_inputs()))
    inside = (ids == targets[:, None]).any(1)  # (R,)
    assert 10 < int(inside.sum()) < len(inside) - 10  # the reference has both kinds of row
    r_in = int(torch.nonzero(inside[16:32])[0]) + 16  # shard 1: a row whose target is in its top-k
    r_out = int(torch.nonzero(~inside[32:48])[0]) + 32  # shard 2: one whose target is not
    assert verify(store)[0] == 0

    def positive(v):
        v[4] = 0.5

    def off_its_topk_value(v):  # 4x the bf16 rounding of that top-k log-prob
        v[r_in - 16] = float(lp[r_in, (ids[r_in] == targets[r_in]).nonzero()[0, 0]]) * (1 - 4 * 2.0**-8) - 1e-3

    def above_the_kth(v):
        v[r_out - 32] = float(lp[r_out, -1]) * (1 - 4 * 2.0**-8) + 1e-3

    for s, change in ((0, positive), (1, off_its_topk_value), (2, above_the_kth)):
        rewrite_rows(store, "observed_logprob", s, change)
    code, out = verify(store)
    assert code == 1 and "files     OK" in out and "chunks    OK" in out, out
    assert "observed_logprob shard 0 (file observed_logprob/c/0): 1 row(s) with a non-finite or positive" in out
    assert (
        f"observed_logprob shard 1 (file observed_logprob/c/1): 1 row(s) whose target is in the top-k but whose "
        f"log-prob differs from its top-k one beyond the bf16 rounding (first: row {r_in})" in out
    )
    assert (
        f"observed_logprob shard 2 (file observed_logprob/c/2): 1 row(s) whose target is outside the top-k but "
        f"more likely than the k-th token (first: row {r_out})" in out
    )
    assert "PROBLEMS (3)" in out


def test_nan_observed_logprob_fails_on_read(store):
    """A NaN (what a missing chunk reads as) written with valid checksums: refused on read, like a NaN tail."""

    def nan(v):
        v[3] = np.nan

    rewrite_rows(store, "observed_logprob", 1, nan)
    with pytest.raises(CacheCorruptError, match=r"observed_logprob shard 1 .* holds NaN observed log-probs .* 19") as e:
        read_everything(store)
    one_line(e)
    code, out = verify(store)
    assert code == 1 and "1 row(s) with a non-finite or positive observed log-prob (first: row 19)" in out


REPAIRABLE = {
    **{f"flip {a}": (lambda p, rel=rel: flip(p, rel)) for a, rel in FLIPS.items()},
    **{k: v[0] for k, v in FILE_FAULTS.items()},
}


@pytest.mark.parametrize("fault", REPAIRABLE)
def test_repair_then_resume_is_bit_identical(store, reference, fault):
    ref_path, rows, ref_snap = reference
    REPAIRABLE[fault](store)
    code, out = verify(store, "--repair")
    assert code == 1 and "repair: dropped the" in out
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(store)
    w = create(store, provenance=PROV_V)  # what Stage 1 does: resume, write the rows of the shards not done
    assert w.resumed and not w.complete
    with w:
        write_all(w, rows, step=range(0, w.n_rows, 10))
    assert snapshot(store) == ref_snap
    assert verify(store)[0] == 0


@pytest.mark.parametrize("fault", FILE_FAULTS)
def test_resume_alone_redoes_exactly_the_failing_shards(store, reference, fault):
    """Without --repair: create_or_resume treats a done shard whose files fail the stat check as not done."""
    _, rows, ref_snap = reference
    FILE_FAULTS[fault][0](store)
    w = create(store, provenance=PROV_V)
    expect = {"deleted shard file": 2, "truncated shard": 2, "deleted manifest": 2, "deleted token file": 3}[fault]
    assert w.shards_done == expect and not w.complete == (expect < 3)
    with w:
        write_all(w, rows)
    assert snapshot(store) == ref_snap


def test_old_schema_refused(store):
    zarr.open_group(store, mode="r+").attrs["schema_version"] = 1
    with pytest.raises(CacheError, match="schema version 1, this code reads versions 2, 3, 4"):
        open_cache(store)
    code, out = verify(store)
    assert code == 1 and "schema version 1" in out


def test_stage1_store_verifies_clean_and_repairs(tiny, tmp_path):
    """The real tiny teacher through Stage 1: clean (its mass sums hold within the bf16 bound); a flipped
    shard is found, repaired and rewritten by a Stage 1 rerun to the same arrays."""
    import copy

    from tests.conftest import make_cache

    cfg = copy.deepcopy(tiny)
    cfg.cache.splits = ["validation"]
    cfg.cache.shard_rows = 64
    make_cache(cfg, tmp_path / "cache")
    path = tmp_path / "cache/validation.zarr"
    shutil.copytree(path, tmp_path / "clean.zarr")
    code, out = verify(path)
    assert code == 0, out
    n = zarr.open_group(path, mode="r").attrs["n_shards"]
    flip(path, f"topk_logprobs/c/{n - 1}/0")
    assert verify(path)[0] == 1
    assert "repair: dropped the completion records of shards" in verify(path, "--repair")[1]
    make_cache(cfg, tmp_path / "cache")
    a, b = zarr.open_group(path, mode="r"), zarr.open_group(tmp_path / "clean.zarr", mode="r")
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "hidden", "input_ids", "supervised"):
        assert np.array_equal(a[name][...], b[name][...]), name
    assert verify(path)[0] == 0

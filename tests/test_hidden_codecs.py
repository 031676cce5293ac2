"""Hidden-state codecs (cache/codecs.py, pipeline/teacher/codecs.py): each round-trips within its stated bound, the
fitted bases are what they claim to be, a store holds and decodes them, and Stage 1 writes them."""

import copy

import numpy as np
import pytest
import torch
import zarr

from cache import CacheError, CacheMismatchError, codecs, open_cache
from cache.verify import verify
from pipeline.teacher.codecs import fisher_basis, fit_basis, pca_basis, svd_basis
from tests.conftest import D, create, make_cache, make_inputs, make_rows, write_all

pytestmark = pytest.mark.usefixtures("one_thread")


def hidden_rows(n=203, d=37, seed=0):
    """Awkward rows: a few outlier dimensions (as real LM hidden states have), a zero row, tiny and huge rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    h[:, 3] *= 40
    h[0] = 0
    h[1] *= 1e-6
    h[2] *= 1e3
    return h


def random_basis(d=37, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return codecs.Basis(
        torch.randn(d, generator=g).numpy(),
        torch.randn(r, d, generator=g).numpy(),
        torch.randn(r, d, generator=g).numpy(),
    )


@pytest.mark.parametrize("codec", ["bf16", "fp16", "int8", "pca:5"])
def test_roundtrip_within_bound(codec):
    h = hidden_rows()
    basis = random_basis() if codec == "pca:5" else None
    got = codecs.decode(codecs.encode(h, codec, basis), codec, basis)  # (n, D) float32
    assert got.shape == tuple(h.shape) and got.dtype == np.float32
    target = codecs.project(h.numpy(), basis) if basis else h.double().numpy()
    err = np.abs(got - target)
    b = codecs.bound(h.numpy(), codec, basis)
    assert (err <= b).all(), f"{codec}: worst err / bound {(err / b).max():.3g}"
    # the bound is not vacuous: the error reaches a good part of it somewhere
    assert np.nanmax(err / np.where(b > 0, b, np.nan)) > 0.1
    if codec == "int8":  # the zero row stays exactly zero, no NaN from a 0 scale
        assert (got[0] == 0).all()


def test_bf16_tensor_stored_bit_for_bit():
    h = hidden_rows().bfloat16()
    got = codecs.decode(codecs.encode(h, "bf16"), "bf16")
    assert torch.equal(torch.from_numpy(got), h.float())


def test_low_rank_recovers_rows_inside_its_span():
    """A basis with orthonormal E = F: rows in mean + span(E) come back up to bf16 rounding of the coefficients."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(37, 5, generator=g, dtype=torch.float64))
    mean = torch.randn(37, generator=g, dtype=torch.float64)
    basis = codecs.Basis(mean.numpy(), q.T.numpy(), q.T.numpy())
    h = mean + torch.randn(50, 5, generator=g, dtype=torch.float64) @ q.T  # (50, 37)
    got = codecs.decode(codecs.encode(h.float(), "pca:5", basis), "pca:5", basis)
    assert np.abs(got - h.numpy()).max() <= codecs.bound(h.numpy(), "pca:5", basis).max()
    assert np.abs(got - h.numpy()).max() < 0.05


def test_parse_and_refusals():
    assert codecs.parse("fisher:64") == ("fisher", 64) and codecs.parse("int8") == ("int8", None)
    for bad in ("pca:0", "pca", "int4", "svd:-1", "PCA:4"):
        with pytest.raises(ValueError, match="hidden codec"):
            codecs.parse(bad)
    with pytest.raises(ValueError, match="larger than the hidden size"):
        codecs.stored_width("pca:40", 37)
    with pytest.raises(ValueError, match="needs its basis"):
        codecs.encode(hidden_rows(), "pca:5")


# ---------------------------------------------------------------------------------------------------------------
# fitted bases
# ---------------------------------------------------------------------------------------------------------------


def test_pca_basis_finds_the_data_subspace():
    g = torch.Generator().manual_seed(2)
    h = 3 + torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 29, generator=g, dtype=torch.float64)
    b = pca_basis(h, 6)
    assert np.abs(codecs.project(h.numpy(), b) - h.numpy()).max() < 1e-4  # rank-6 data: nothing lost
    np.testing.assert_allclose(b.encoder @ b.encoder.T, np.eye(6), atol=1e-5)
    lossy = pca_basis(h, 3)  # fewer directions than the data has: loses, but keeps the most variance
    kept = ((codecs.project(h.numpy(), lossy) - b.mean) ** 2).sum()
    rand = codecs.Basis(
        b.mean,
        np.linalg.qr(np.random.default_rng(0).normal(size=(29, 3)))[0].T,
        np.linalg.qr(np.random.default_rng(0).normal(size=(29, 3)))[0].T,
    )
    assert kept > ((codecs.project(h.numpy(), rand) - b.mean) ** 2).sum()


def test_svd_basis_is_lm_heads_right_singular_vectors():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(301, 23, generator=g) * torch.logspace(0, -2, 23)  # distinct singular values
    b = svd_basis(W, 4)
    _, _, vh = torch.linalg.svd(W.double(), full_matrices=False)
    np.testing.assert_allclose(np.abs(b.encoder @ vh[:4].numpy().T), np.eye(4), atol=1e-5)  # up to sign
    assert (b.mean == 0).all() and np.array_equal(b.encoder, b.decoder)


def kl_rows(h, h2, W):
    """Mean KL(softmax(W h) || softmax(W h2)) in float64."""
    p = (h.double() @ W.double().T).log_softmax(-1)
    q = (torch.as_tensor(h2).double() @ W.double().T).log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_fisher_basis_keeps_what_moves_the_distribution():
    """h varies most along directions lm_head ignores: PCA keeps those and loses the distribution, the Fisher code
    keeps the directions that change softmax(W h)."""
    g = torch.Generator().manual_seed(4)
    D, V, r = 24, 211, 8
    W = torch.randn(V, D, generator=g)
    W[:, :8] *= 1e-3  # lm_head barely sees dimensions 0-7 (nor 16-23) ...
    W[:, 16:] *= 1e-3
    h = torch.randn(400, D, generator=g)
    h[:, :8] *= 30  # ... and h varies most along 0-7
    pca, fisher = pca_basis(h, r), fisher_basis(h, W, r)
    kl_pca, kl_fisher = kl_rows(h, codecs.project(h.numpy(), pca), W), kl_rows(h, codecs.project(h.numpy(), fisher), W)
    assert kl_fisher < 0.05 * kl_pca, (kl_fisher, kl_pca)
    # a code: decoding the encoded basis directions gives them back (F E^T restricted to the code is the identity)
    np.testing.assert_allclose(fisher.encoder.astype(np.float64) @ fisher.decoder.T, np.eye(r), atol=1e-4)
    with pytest.raises(ValueError, match="has no basis"):
        fit_basis("int8", h, W)


# ---------------------------------------------------------------------------------------------------------------
# in a store
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["int8", "pca:4"])
def test_store_roundtrip_and_verify(tmp_path, codec):
    basis = random_basis(D, 4) if codec == "pca:4" else None
    w = create(tmp_path / "c.zarr", hidden_codec=codec, hidden_basis=basis)
    rows = make_rows(w.n_rows)
    with w:
        write_all(w, rows, step=range(0, w.n_rows, 7))
    c = open_cache(tmp_path / "c.zarr")
    assert c.hidden_codec == codec and c.has_hidden
    want = codecs.decode(codecs.encode(rows[3], codec, basis), codec, basis)  # (R, D)
    got = np.concatenate([x["hidden"] for x in c.read_many(range(len(c)))])
    np.testing.assert_array_equal(got, want)
    report = verify(tmp_path / "c.zarr")  # (make_rows' log-probs break the row contract: only hidden* counts here)
    assert report.shards_checked == w.n_shards and not [p for p in report.problems if "hidden" in p.array], (
        report.text()
    )
    stored = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert stored["hidden"].shape[1] == (4 if basis else D) and stored.attrs["hidden_codec"] == codec


def test_store_refuses_another_basis_on_resume(tmp_path):
    w = create(tmp_path / "c.zarr", hidden_codec="pca:4", hidden_basis=random_basis(D, 4, seed=0))
    w.close()
    with pytest.raises(CacheMismatchError, match="hidden_basis_sha"):
        create(tmp_path / "c.zarr", hidden_codec="pca:4", hidden_basis=random_basis(D, 4, seed=1))
    with pytest.raises(ValueError, match="needs a hidden_basis of rank 4"):
        create(tmp_path / "d.zarr", hidden_codec="pca:4")


def test_missing_basis_is_corruption_not_zeros(tmp_path):
    w = create(tmp_path / "c.zarr", hidden_codec="pca:4", hidden_basis=random_basis(D, 4))
    with w:
        write_all(w, make_rows(w.n_rows))
    (tmp_path / "c.zarr/hidden_decoder/c/0/0").unlink()
    with pytest.raises(CacheError):
        open_cache(tmp_path / "c.zarr").read(0)


def test_missing_int8_chunk_is_found_by_verify(tmp_path):
    w = create(tmp_path / "c.zarr", hidden_codec="int8", inputs=make_inputs())
    with w:
        write_all(w, make_rows(w.n_rows))
    f = tmp_path / f"c.zarr/hidden/c/{0}/0"
    f.unlink()
    assert [p.array for p in verify(tmp_path / "c.zarr").problems if p.check == "files"] == ["hidden"]


# ---------------------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------------------


def test_stage1_writes_each_codec(tiny, tmp_path):
    """One teacher, three caches: int8 and fisher:16 decode to the bf16 cache's hidden states within their loss,
    and every split of a low-rank cache shares one basis."""
    ref = open_cache(make_cache(tiny, tmp_path / "bf16").cache.out + "/train.zarr")
    h_ref = np.concatenate([x["hidden"] for x in ref.read_many(range(len(ref)), ["hidden"])])  # (R, D)
    for codec in ("int8", "fisher:16"):
        cfg = copy.deepcopy(tiny)
        cfg.cache.hidden_codec, cfg.cache.hidden_calibration_rows = codec, 300
        cfg = make_cache(cfg, tmp_path / codec.replace(":", "_"))
        c = open_cache(cfg.cache.out + "/train.zarr")
        assert c.provenance["params"]["hidden_codec"] == codec
        h = np.concatenate([x["hidden"] for x in c.read_many(range(len(c)), ["hidden"])])
        rel = np.linalg.norm(h - h_ref) / np.linalg.norm(h_ref)
        if codec == "int8":
            assert rel < 0.01
        else:  # rank 16 of 64: lossy, but far from nothing (a random 16-dim projection keeps ~25% of the norm)
            assert 1e-3 < rel < 0.5
            val = open_cache(cfg.cache.out + "/validation.zarr")
            np.testing.assert_array_equal(val.basis.decoder, c.basis.decoder)


def test_reading_with_another_codec_expected_fails_clearly(tmp_path):
    w = create(tmp_path / "c.zarr", hidden_codec="int8")
    with w:
        write_all(w, make_rows(w.n_rows))
    assert open_cache(tmp_path / "c.zarr", expect={"hidden_codec": "int8"}).hidden_codec == "int8"
    with pytest.raises(CacheMismatchError, match="hidden_codec='int8' but hidden_codec='bf16' is expected"):
        open_cache(tmp_path / "c.zarr", expect={"hidden_codec": "bf16"})


def test_a_schema_2_store_still_reads(tmp_path):
    """Schema 2 named the hidden storage hidden_dtype (bf16/fp16/None) with the layout of today's bf16/fp16 codecs:
    such a store opens, reads and verifies the same (its attributes rewritten the way schema 2 wrote them)."""
    w = create(tmp_path / "c.zarr")
    rows = make_rows(w.n_rows)
    with w:
        write_all(w, rows)
    before = [x["hidden"] for x in open_cache(tmp_path / "c.zarr").read_many(range(7))]
    g = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    a = g.attrs.asdict()
    a["schema_version"], a["hidden_dtype"] = 2, a.pop("hidden_codec")
    a["plan"]["hidden_dtype"] = a["plan"].pop("hidden_codec")
    del a["plan"]["hidden_basis_sha"]
    g.attrs.clear()
    g.attrs.update(a)
    c = open_cache(tmp_path / "c.zarr")
    assert c.hidden_codec == "bf16" and c.basis is None
    for x, y in zip(c.read_many(range(7)), before):
        np.testing.assert_array_equal(x["hidden"], y)
    assert not [p for p in verify(tmp_path / "c.zarr").problems if p.check in ("files", "chunks")]


def test_flipped_bytes_in_the_basis_are_found(tmp_path):
    """The basis decodes every row: a changed byte in it fails its chunk checksum on open and in verify_cache."""
    w = create(tmp_path / "c.zarr", hidden_codec="pca:4", hidden_basis=random_basis(D, 4))
    with w:
        write_all(w, make_rows(w.n_rows))
    f = tmp_path / "c.zarr/hidden_decoder/c/0/0"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(CacheError, match="hidden_decoder .* fails its crc32c checksum"):
        open_cache(tmp_path / "c.zarr")
    found = {(p.array, p.shard, p.check) for p in verify(tmp_path / "c.zarr").problems}
    assert ("hidden_decoder", None, "chunks") in found and ("hidden_decoder", None, "files") in found


def test_stage1_repairs_a_damaged_basis_from_the_other_split(tiny, tmp_path):
    """A changed byte in train.zarr's basis: rerunning Stage 1 takes the (shared) basis from validation.zarr,
    rewrites the damaged file and leaves a store that verifies clean, with the same basis as before."""
    cfg = copy.deepcopy(tiny)
    cfg.cache.hidden_codec, cfg.cache.hidden_calibration_rows = "fisher:8", 300
    cfg = make_cache(cfg, tmp_path / "c")
    train = tmp_path / "c/train.zarr"
    before = open_cache(train).basis.decoder.copy()
    f = train / "hidden_decoder/c/0/0"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    assert not verify(train).ok
    make_cache(cfg, tmp_path / "c")
    assert verify(train).ok
    np.testing.assert_array_equal(open_cache(train).basis.decoder, before)

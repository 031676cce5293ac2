"""bench/hidden_bench.py: its byte count is what the store writes, and its --quick run gives sane numbers."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import zarr

from cache import codecs
from cache.schema import array_specs
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hidden_bench", ROOT / "bench/hidden_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("codec", ["bf16", "int8", "pca:8"])
def test_bytes_match_a_zarr_write(bench, codec):
    n, D, shard = 1024, 64, 512
    h = torch.randn(n, D, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, D)
    basis = codecs.Basis(np.zeros(D), np.eye(8, D), np.eye(8, D)) if codec.startswith("pca") else None
    stored = codecs.encode(h, codec, basis)
    got = bench.stored_bytes(stored, codec, D, shard)
    store = zarr.storage.MemoryStore()
    specs = array_specs(1, 1, n, k=1, logprob_dtype="bf16", hidden_codec=codec, hidden_size=D, shard_rows=shard)
    for name, a in stored.items():
        zarr.create_array(store, name=name, **specs[name])[...] = a
    on_disk = sum(
        len(v.to_bytes())
        for k, v in store._store_dict.items()
        if k.split("/")[0] in stored and not k.endswith("zarr.json")
    )
    assert got["zstd"] == pytest.approx(on_disk / n, rel=0.01)
    assert got["raw"] == sum(a.nbytes for a in stored.values()) / n


def test_quick_run(bench, tmp_path):
    res = bench.main(["--quick", "--only", "b", "--rows", "128", "--fit-rows-b", "256", "--out", str(tmp_path / "hb")])
    assert json.loads((tmp_path / "hb.json").read_text())["verdicts"] == res["verdicts"]
    assert "| int8 |" in (tmp_path / "hb.md").read_text()
    c = res["b"]["codecs"]
    D = res["b"]["D"]
    assert c["bf16"]["raw_x_bf16"] == 1 and c["int8"]["raw_bytes"] == D + 4
    assert c["pca:8"]["raw_bytes"] == 16
    # fp16 keeps 3 more mantissa bits than bf16; int8 and low rank lose more, and more at lower rank
    assert 0 <= c["fp16"]["kl_mean"] < c["bf16"]["kl_mean"] < c["int8"]["kl_mean"] < c["pca:32"]["kl_mean"]
    for kind in bench.KINDS:
        assert c[f"{kind}:8"]["kl_mean"] > c[f"{kind}:32"]["kl_mean"]
    assert all(0 <= v["top1_agree"] <= 1 and 0 <= v["top64_overlap"] <= 1 for v in c.values())
    assert res["b"]["teacher"]["median_top1_prob"] == pytest.approx(0.8, abs=0.05)

"""Stage 1 end to end: the real `python -m stages.cache_teacher` on the tiny embedded default."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

from cache.reader import open_cache
from pipeline.config.base import save_config
from pipeline.data.records import IGNORE
from tests.conftest import ROOT, stage

ARRAYS = (
    "topk_ids",
    "topk_logprobs",
    "tail_logmass",
    "observed_logprob",
    "hidden",
    "input_ids",
    "supervised",
    "sample_ids",
    "token_offsets",
    "row_offsets",
)


def params_file(cfg, path: Path, **cache) -> str:
    """Write cfg (a copy, with `cache` fields replaced) as a params file for the CLI."""
    cfg = copy.deepcopy(cfg)
    for k, v in cache.items():
        setattr(cfg.cache, k, v)
    save_config(cfg, path)
    return str(path)


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    """Stage 1 run once through the real CLI into a fresh folder."""
    tmp = tmp_path_factory.mktemp("stage1")
    cfg = tiny
    params = params_file(cfg, tmp / "params.yaml", out=str(tmp / "cache"))
    stage("cache_teacher", "--params", params)
    return cfg, tmp / "cache"


def test_stage1_writes_what_the_teacher_computes(cached):
    """Every stored row equals a dense float64 log-softmax of the full model's logits at that position."""
    cfg, out = cached
    model = AutoModelForCausalLM.from_pretrained(cfg.cache.teacher, dtype=torch.float64).eval()
    tokenizer_size = open_cache(out / "train.zarr").provenance["tokenizer_size"]
    for split in ("train", "validation"):
        c = open_cache(out / f"{split}.zarr")
        assert len(c) > 0 and c.k == cfg.cache.k
        for i in range(0, len(c), max(1, len(c) // 5)):
            s = c.read(i)
            ids = torch.as_tensor(s["input_ids"], dtype=torch.long)[None]
            with torch.no_grad():
                out_ = model(ids, output_hidden_states=True)
            lp = torch.log_softmax(out_.logits[0, :, :tokenizer_size], -1)  # (L, V) float64
            pos = np.flatnonzero(s["supervised"])  # rows stored at positions j whose next token is supervised
            assert len(pos) == len(s["topk_ids"]) > 0
            ref_vals, ref_ids = lp[pos].topk(c.k, -1)
            assert (torch.as_tensor(s["topk_ids"]) == ref_ids).float().mean() > 0.97  # ties may swap
            got = torch.gather(lp[pos], 1, torch.as_tensor(s["topk_ids"]).long())
            torch.testing.assert_close(torch.as_tensor(s["topk_logprobs"]).double(), got, atol=2e-2, rtol=1e-2)
            ref_tail = torch.log1p(-ref_vals.exp().sum(-1))
            torch.testing.assert_close(torch.as_tensor(s["tail_logmass"]).double(), ref_tail, atol=1e-3, rtol=1e-3)
            ref_obs = lp[pos, ids[0, pos + 1]]  # (R,) the token that actually follows, in the top-k or not
            torch.testing.assert_close(torch.as_tensor(s["observed_logprob"]).double(), ref_obs, atol=1e-3, rtol=1e-3)
            h = torch.as_tensor(np.asarray(s["hidden"], dtype=np.float32)).double()
            torch.testing.assert_close(h, out_.hidden_states[-1][0, pos], atol=5e-2, rtol=2e-2)  # bf16 storage


def test_rows_follow_the_label_contract(cached, tiny):
    """supervised[j] == (labels[j+1] != IGNORE): row j predicts token j+1, and the last token has no row."""
    from pipeline.data.records import load_splits
    from pipeline.models import load_tokenizer

    cfg, out = cached
    splits = load_splits(cfg.data, load_tokenizer(cfg.cache.teacher), log=lambda *_: None)
    by_id = {r["sample_id"]: r for r in splits["train"]}
    c = open_cache(out / "train.zarr")
    assert sorted(c.sample_ids) == sorted(by_id)
    for i in range(len(c)):
        s = c.read(i)
        ex = by_id[c.sample_ids[i]]
        assert list(s["input_ids"]) == ex["input_ids"]
        expect = [lab != IGNORE for lab in ex["labels"][1:]] + [False]
        assert list(s["supervised"]) == expect


def test_plain_zarr_reads_the_store(cached):
    _, out = cached
    g = zarr.open_group(str(out / "train.zarr"), mode="r")
    assert g.attrs["complete"] is True and g.attrs["provenance"]["tokenizer_size"] > 0
    for name in ARRAYS:
        assert name in g, name
    n_rows = int(g["row_offsets"][-1])
    assert g["topk_ids"].shape == (n_rows, g.attrs["k"]) and g["tail_logmass"].shape == (n_rows,)
    assert g["observed_logprob"].shape == (n_rows,) and g.attrs["schema_version"] == 4
    assert g["topk_logprobs"].attrs.get("logical_dtype") == "bfloat16"


def test_rerun_on_complete_store_does_nothing(cached):
    cfg, out = cached
    before = {p: p.stat().st_mtime_ns for p in (out / "train.zarr").rglob("*") if p.is_file()}
    p = stage("cache_teacher", "--params", params_file(cfg, out.parent / "params.yaml", out=str(out)))
    assert "nothing to do" in p.stdout
    after = {p: p.stat().st_mtime_ns for p in (out / "train.zarr").rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("codec", ["bf16", "fisher:16"])
def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path, codec):
    """A real Stage 1 process killed with SIGKILL mid-run, rerun, equals an uninterrupted run; with a low-rank
    hidden codec the rerun encodes with the basis the killed run stored (it fits none of its own)."""
    cfg = tiny
    common = dict(shard_rows=64, batch_tokens=256, splits=["train"], hidden_codec=codec, hidden_calibration_rows=300)
    clean = params_file(cfg, tmp_path / "clean.yaml", out=str(tmp_path / "clean"), **common)
    stage("cache_teacher", "--params", clean)

    killed = params_file(cfg, tmp_path / "killed.yaml", out=str(tmp_path / "killed"), **common)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the stage with a 0.05 s pause per batch (tests/slow_stage1.py), so the kill lands mid-run
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/slow_stage1.py"), "0.05", "--params", killed],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = tmp_path / "killed/train.zarr/shard_done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and sum(1 for p in done.rglob("*") if p.is_file() and p.name != "zarr.json") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "stage 1 finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(Exception, match="incomplete"):
        open_cache(tmp_path / "killed/train.zarr")
    p = stage("cache_teacher", "--params", killed)
    assert "batches to run" in p.stdout and "basis fitted" not in p.stdout

    a = zarr.open_group(str(tmp_path / "clean/train.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "killed/train.zarr"), mode="r")
    for name in ARRAYS + (("hidden_mean", "hidden_encoder", "hidden_decoder") if codec != "bf16" else ()):
        assert np.array_equal(a[name][...], b[name][...]), name
    assert b.attrs["complete"] is True and b.attrs["hidden_codec"] == codec


@pytest.mark.parametrize("name", ["prepare", "finetune_teacher", "cache_teacher"])
def test_help(name):
    p = stage(name, "--help")
    assert "Usage" in p.stdout and "--params" in p.stdout


def bad(cfg, tmp_path, *args, **cache) -> str:
    p = stage("cache_teacher", "--params", params_file(cfg, tmp_path / "p.yaml", **cache), *args, check=False)
    assert p.returncode != 0
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


def test_bad_teacher_path(tiny, tmp_path):
    msg = bad(tiny, tmp_path, teacher=str(tmp_path / "no-such-teacher"), out=str(tmp_path / "c"))
    assert "no-such-teacher" in msg and "does not exist" in msg


def test_k_larger_than_vocab(tiny, tmp_path):
    assert "larger than the tokenizer's vocabulary" in bad(tiny, tmp_path, k=100000, out=str(tmp_path / "c"))


def test_store_from_another_teacher_is_refused(tiny, cached, tmp_path):
    _, out = cached
    student = str(Path(tiny.prepare.out_models) / "student")  # same tokenizer, other model
    msg = bad(tiny, tmp_path, teacher=student, out=str(out))
    assert "teacher" in msg and str(out) in msg
    assert open_cache(out / "train.zarr").provenance["teacher"] == tiny.cache.teacher  # untouched


def test_bad_data_is_one_line(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "1", "input": "", "output": "2"}\n{"instruction": "1"\n')
    cfg = copy.deepcopy(tiny)
    cfg.data.path = str(data)
    assert "d.jsonl:2" in bad(cfg, tmp_path, out=str(tmp_path / "c"))
    data.write_text("")
    assert "empty" in bad(cfg, tmp_path, out=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_quantised_teacher_without_hidden_states(tiny, tmp_path):
    """The 4-bit NF4 teacher path (bitsandbytes on CPU), fp16 log-probs and no hidden states."""
    from pipeline.teacher import cache_teacher as teacher_cache

    cfg = copy.deepcopy(tiny)
    cfg.cache.out, cfg.cache.splits = str(tmp_path / "q"), ["validation"]
    cfg.cache.load_in_bits, cfg.cache.hidden_codec, cfg.cache.logprob_dtype = 4, "none", "fp16"
    teacher_cache.run(cfg)
    c = open_cache(tmp_path / "q/validation.zarr", expect={"logprob_dtype": "fp16"})
    assert not c.has_hidden and c.provenance["params"]["load_in_bits"] == 4
    n_tok = c.provenance["tokenizer_size"]
    for i in range(len(c)):
        s = c.read(i)
        assert (s["topk_ids"] < n_tok).all() and np.isfinite(s["tail_logmass"]).all()
        p = np.exp(s["topk_logprobs"]).sum(-1) + np.exp(s["tail_logmass"])
        np.testing.assert_allclose(p, 1.0, atol=2e-3)  # fp16 log-probs: ~1e-3 relative
        assert (np.diff(s["topk_logprobs"], axis=-1) <= 0).all()  # rank order

"""A cache on object storage (cache/location.py): a real S3-compatible server process (moto's standalone server,
started here on localhost; credentials and endpoint from the environment only) holds the store. Stage 1 writes it
through fsspec with the same completion-record semantics: killed mid-run (SIGKILL), rerun with 2 torchrun ranks,
every object is byte-identical to the files of a local single-process store. open_cache, verify_cache and Stage 2
read it by URL."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache import open_cache
from cache.verify import repair, verify
from pipeline.config.base import save_config
from tests.conftest import ROOT, distill_cfg, read_tsv, stage
from tests.test_parallel_stage1 import ENV, torchrun
from tests.test_stage1 import params_file

pytestmark = pytest.mark.slow
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

COMMON = dict(shard_rows=64, batch_tokens=256, splits=["train", "validation"])
BUCKET = "otkd-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server process on a free local port; the environment points boto/fsspec at it (as a user's
    AWS_ENDPOINT_URL / credentials would), for this process and the stages it starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    ENV.update(creds)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            ENV.pop(k, None)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def objects(fs, url: str) -> dict[str, bytes]:
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {f[len(root) + 1 :]: fs.cat_file(f) for f in fs.find(root)}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory) -> Path:
    """The reference: the same Stage 1 into a local folder, one process."""
    tmp = tmp_path_factory.mktemp("local")
    stage("cache_teacher", "--params", params_file(tiny, tmp / "local.yaml", out=str(tmp / "cache"), **COMMON))
    return tmp / "cache"


def test_stage1_to_s3_killed_then_resumed_by_two_ranks_is_byte_identical(tiny, s3, local, tmp_path):

    url = f"s3://{BUCKET}/run1/cache"
    params = params_file(tiny, tmp_path / "s3.yaml", out=url, **COMMON)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/slow_stage1.py"), "0.1", "--params", params],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        s3.invalidate_cache()
        if len(s3.glob(f"{BUCKET}/run1/cache/train.zarr/shard_done/c/*")) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "Stage 1 finished (or failed) before it could be killed:\n" + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(Exception, match="incomplete"):
        open_cache(f"{url}/train.zarr")

    p = torchrun(2, "-m", "stages.cache_teacher", "--params", params)
    assert "object storage has no locks" in p.stderr  # said, not hidden
    for split in ("train.zarr", "validation.zarr"):
        assert objects(s3, f"{url}/{split}") == files(local / split), split
    for f in ("teacher_embeddings.safetensors", "tokenizer/tokenizer.json"):
        assert s3.cat_file(f"{BUCKET}/run1/cache/{f}") == (local / f).read_bytes()

    c, ref = open_cache(f"{url}/train.zarr"), open_cache(local / "train.zarr")
    for i in (0, len(c) - 1):
        a, b = c.read(i), ref.read(i)
        assert all(np.array_equal(a[k], b[k]) for k in ("input_ids", "topk_ids", "topk_logprobs", "hidden"))
    assert "CLEAN" in stage("verify_cache", f"{url}/train.zarr").stdout  # the CLI takes a URL

    # faults on the object store: a shard object deleted, another one's bytes flipped
    gone, flipped = f"{BUCKET}/run1/cache/train.zarr/topk_ids/c/5/0", f"{BUCKET}/run1/cache/train.zarr/hidden/c/9/0"
    s3.rm_file(gone)
    data = bytearray(s3.cat_file(flipped))
    data[len(data) // 2] ^= 0xFF
    s3.pipe_file(flipped, bytes(data))
    with pytest.raises(Exception, match="topk_ids shard 5 .*file missing"):
        open_cache(f"{url}/train.zarr")
    report = verify(f"{url}/train.zarr", progress=False)  # hashes every object: finds both
    assert {p.shard for p in report.problems} == {5, 9}
    repair(f"{url}/train.zarr", report)
    p = stage("cache_teacher", "--params", params)  # rewrites exactly those two shards
    assert "validation.zarr: complete and up to date" in p.stdout
    assert objects(s3, f"{url}/train.zarr") == files(local / "train.zarr")


def test_stage2_reads_the_cache_by_url(tiny, s3, local, tmp_path):
    """The same student steps from the remote store as from the local one (a copy of it), the remote one read by a
    DataLoader worker process (its own fsspec/Zarr handles, opened after the fork)."""
    url = f"s3://{BUCKET}/run2/cache"
    s3.put(str(local), f"{BUCKET}/run2/cache", recursive=True)
    curves = []
    for name, cache in (("a", str(local)), ("b", url)):
        cfg = distill_cfg(tiny, tmp_path / name / "s", max_steps=2, w_ot=0.5, eval_steps=1)
        cfg.distill.cache, cfg.distill.num_workers = cache, int(cache == url)
        save_config(cfg, tmp_path / f"{name}.yaml")
        stage("distill_student", "--params", str(tmp_path / f"{name}.yaml"))
        curves.append(read_tsv(tmp_path / name / "plots/train_s.tsv"))
    assert [r["loss"] for r in curves[0]] == [r["loss"] for r in curves[1]]


def test_a_remote_creation_killed_midway_is_repaired_on_resume(s3, tmp_path, monkeypatch):
    """No directory rename on object storage: a store is created in place, its base manifest last. Killed before
    that (here: the per-sequence data never written), the next run resumes it, rewrites the base from the inputs and
    ends with the same objects as a local store."""
    from cache import writer as writer_mod
    from tests.conftest import create, make_inputs, make_rows, write_all

    inputs = make_inputs()
    rows = make_rows(int(sum(m.sum() for m in inputs["supervised_per_seq"])))
    local = create(tmp_path / "local.zarr", inputs)
    write_all(local, rows)
    assert local.close()

    url = f"s3://{BUCKET}/half/s.zarr"
    with monkeypatch.context() as m:

        def killed(*a, **kw):
            raise KeyboardInterrupt("killed after the arrays, before the data and the base manifest")

        m.setattr(writer_mod, "_write_base", killed)
        with pytest.raises(KeyboardInterrupt):
            create(url, inputs)
    s3.invalidate_cache()
    assert s3.exists(f"{BUCKET}/half/s.zarr/zarr.json") and not s3.exists(
        f"{BUCKET}/half/s.zarr/manifest/base/zarr.json"
    )
    with pytest.raises(Exception, match="incomplete"):
        open_cache(url)
    w = create(url, inputs)  # resumes and repairs
    assert w.resumed
    write_all(w, rows)
    assert w.close()
    assert objects(s3, url) == files(tmp_path / "local.zarr")

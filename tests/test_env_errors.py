"""Environment errors (issue "Cache integrity"): an output path that is a file or read-only, undecodable or
malformed data, data.max_length beyond the model's positions, a hub name without network. Each is one `error:`
line naming what to fix, and leaves nothing behind in the output path that a later run could trust."""

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache.errors import CacheError
from pipeline.config.base import save_config
from pipeline.data.records import DataError, read_records
from pipeline.models import ModelLoadError, check_max_length, load_tokenizer
from tests.conftest import ROOT, stage

GOOD = '{"instruction": "add 1 and 2", "output": "3"}'


def one_error_line(p) -> str:
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


def params(cfg, tmp_path: Path, data: dict | None = None, **cache) -> str:
    cfg = copy.deepcopy(cfg)
    for k, v in cache.items():
        setattr(cfg.cache, k, v)
    for k, v in (data or {}).items():
        setattr(cfg.data, k, v)
    path = tmp_path / "params.yaml"
    save_config(cfg, path)
    return str(path)


def stage1(cfg, tmp_path: Path, data: dict | None = None, **cache) -> str:
    return one_error_line(stage("cache_teacher", "--params", params(cfg, tmp_path, data, **cache), check=False))


# ------------------------------------------------------------------------------------------ output path
def test_output_path_is_a_file(tiny, tmp_path):
    out = tmp_path / "cache"
    out.write_text("not a cache")
    msg = stage1(tiny, tmp_path, out=str(out))
    assert f"cache.out={out} is an existing file, not a folder" in msg and "set cache.out" in msg
    assert out.read_text() == "not a cache" and sorted(os.listdir(tmp_path)) == ["cache", "params.yaml"]


def test_output_path_below_a_file(tiny, tmp_path):
    from pipeline.teacher import cache_teacher

    (tmp_path / "f").write_text("x")
    cfg = copy.deepcopy(tiny)
    cfg.cache.out = str(tmp_path / "f/sub/cache")
    with pytest.raises(CacheError, match=f"is below {tmp_path / 'f'}, which is a file, not a folder"):
        cache_teacher.run(cfg)
    assert os.listdir(tmp_path) == ["f"]


def _chattr(folder: Path, flag: str) -> bool:
    return (
        shutil.which("chattr") is not None
        and subprocess.run(["chattr", flag, str(folder)], capture_output=True).returncode == 0
    )


def _ro_mount_works(folder: Path) -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {folder}"], capture_output=True
        ).returncode
        == 0
    )


def test_read_only_output_folder(tiny, tmp_path):
    """The first way this machine allows: chmod 0o555 as a user (EACCES), chattr +i (EPERM, also stops root) or a
    read-only tmpfs in the CLI's own user + mount namespace (EROFS)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    args = ["--params", params(tiny, tmp_path, out=str(ro / "cache"))]
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            p = stage("cache_teacher", *args, check=False)
        finally:
            ro.chmod(0o755)
    elif _chattr(ro, "+i"):
        try:
            p = stage("cache_teacher", *args, check=False)
        finally:
            _chattr(ro, "-i")
    elif _ro_mount_works(ro):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        cmd = f'mount -t tmpfs -o ro none {ro} && exec "$0" -m stages.cache_teacher "$@"'
        p = subprocess.run(
            ["unshare", "-rm", "sh", "-c", cmd, sys.executable, *args],
            cwd=ROOT,
            env=env,
            text=True,
            capture_output=True,
        )
    else:
        pytest.skip("running as root without chattr +i or unprivileged mounts: no way to make a folder read-only")
    msg = one_error_line(p)
    assert f"cache.out={ro / 'cache'}: cannot write in {ro} (read-only or no permission)" in msg, msg
    assert os.listdir(ro) == []


# ------------------------------------------------------------------------------------------ data files
def test_jsonl_bad_byte_names_file_and_line(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + b'{"instruction": "x\xff", "output": "y"}\n')
    msg = stage1(tiny, tmp_path, {"path": str(data)}, out=str(tmp_path / "cache"))
    assert msg == f"error: {data}:3: not UTF-8 text (byte 0xff at column 19); save the file as UTF-8"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        # one JSON document, broken on its second line
        (
            f'[{GOOD},\n {{"instruction": "x", "output": }}]'.encode(),
            ":2: not valid JSON (Expecting value at column 33, position 80)",
        ),
        # JSON Lines in a .json file (datasets reads those too): the line that does not parse
        (
            f'{GOOD}\n{GOOD}\n{{"instruction": "x",\n'.encode(),
            ":3: not valid JSON (Expecting property name enclosed in double quotes at column 21, position 112)",
        ),
        (
            f"[{GOOD},\n".encode() + b' {"instruction": "x\xff", "output": "y"}]',
            ":2: not UTF-8 text (byte 0xff at column 20, byte position 67); save the file as UTF-8",
        ),
        (b"  \n", ": the dataset is empty"),
    ],
)
def test_bad_json(tmp_path, content, expected):
    data = tmp_path / "d.json"
    data.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_records(data)
    assert str(e.value) == f"{data}{expected}"


def test_good_json_and_json_lines_still_load(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([json.loads(GOOD)] * 2))
    (tmp_path / "b.json").write_text(f"{GOOD}\n{GOOD}\n")
    assert (
        read_records(tmp_path / "a.json")
        == read_records(tmp_path / "b.json")
        == [{"instruction": "add 1 and 2", "input": "", "output": "3"}] * 2
    )


def test_corrupt_parquet(tmp_path):
    data = tmp_path / "d.parquet"
    data.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"{data}: not a readable Parquet file"):
        read_records(data)


# ------------------------------------------------------------------------------------------ models
def test_max_length_beyond_the_teacher_positions(tiny, tmp_path):
    msg = stage1(tiny, tmp_path, {"max_length": 4096}, out=str(tmp_path / "cache"))
    teacher = tiny.cache.teacher
    assert msg == (
        f"error: data.max_length=4096 is longer than {teacher} supports (max_position_embeddings=512): "
        "set data.max_length <= 512"
    )
    assert not (tmp_path / "cache").exists()


def test_max_length_of_a_cache(tiny):
    student = str(Path(tiny.prepare.out_models) / "student")
    check_max_length(student, 512, student)  # equal is fine
    with pytest.raises(
        ModelLoadError,
        match=r"data.max_length=513 of the cache c is longer than .* recreate the "
        r"cache c with data.max_length <= 512",
    ):
        check_max_length(student, 513, student, "the cache c")


def test_hub_name_offline_fails_at_once():
    from huggingface_hub import is_offline_mode

    if not is_offline_mode():
        pytest.skip("HF_HUB_OFFLINE is not set in this process")
    with pytest.raises(
        ModelLoadError,
        match="Org/Nope does not exist locally nor in the local hub cache "
        r"\(HF_HUB_OFFLINE is set",
    ):
        load_tokenizer("Org/Nope")


def test_hub_name_with_the_hub_unreachable_fails_fast(tiny, tmp_path):
    """Not offline, but nothing answers at the hub's address: huggingface_hub alone would retry for ~50 s."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_ENDPOINT="http://127.0.0.1:9")  # discard port: refused
    t = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cache_teacher",
            "--params",
            params(tiny, tmp_path),
            "--teacher",
            "Org/Nope",
            "--out",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - t
    msg = one_error_line(p)
    assert "Org/Nope does not exist locally nor in the local hub cache, and the hub is unreachable" in msg, msg
    assert "127.0.0.1:9" in msg and "Retrying" not in p.stderr
    assert elapsed < 25, elapsed  # imports included; the retries alone took ~47 s
    assert not (tmp_path / "cache").exists()

"""Where a cache lives: a local path, or an fsspec URL (s3://, gs://, az://, file://, ...) for shared and object
storage. The few file operations the cache needs besides Zarr's own, for both.

A location is a `Path` (local) or a `str` URL without a trailing slash; `loc()` makes one from what a user wrote.
Zarr opens either (a URL through its fsspec store). Credentials and endpoints come from the environment and
fsspec's configuration (AWS_* variables, AWS_ENDPOINT_URL, ~/.aws, FSSPEC_S3_* ...), never from params.yaml.

What the writer's crash safety needs from a remote store holds on object storage: every object (a shard, a
manifest, a record) is written by one PUT and appears whole or not at all, like a LocalStore file written to a
temp name and renamed. What object storage lacks is a directory rename (so a remote store is created in place, its
`manifest/base` last) and locks (cache/lock.py: no lease on a remote store).
"""

import os
import uuid
import zlib
from pathlib import Path

_BLOCK = 8 << 20


def is_url(p) -> bool:
    return isinstance(p, str) and "://" in p


def loc(p):
    """A location from a user's path or URL (a `file://` URL stays a URL: it goes through fsspec like s3://)."""
    return str(p).rstrip("/") if is_url(str(p)) else Path(p)


def join(p, *parts: str):
    return "/".join([str(p).rstrip("/"), *parts]) if is_url(p) else Path(p).joinpath(*parts)


def name(p) -> str:
    return str(p).rstrip("/").rsplit("/", 1)[-1] if is_url(p) else Path(p).name


def _fs(p):
    import fsspec  # only for URLs

    # no listings cache: Zarr writes through its own filesystem instance, whose objects a cached listing of ours
    # would not show (a shard just written would be "missing")
    return fsspec.core.url_to_fs(str(p), use_listings_cache=False)


def exists(p) -> bool:
    if not is_url(p):
        return os.path.lexists(p)
    fs, path = _fs(p)
    return fs.exists(path)


def size(p) -> int:
    """Bytes of the file at p; FileNotFoundError if there is none."""
    if not is_url(p):
        return Path(p).stat().st_size
    fs, path = _fs(p)
    return int(fs.size(path))


def listing(p) -> dict[str, int] | None:
    """{path relative to p: bytes} of every file below a URL, in one listing (a request per 1,000 objects on S3,
    not one per file); None for a local path, whose files are stat'ed one by one (~1 us each)."""
    if not is_url(p):
        return None
    fs, path = _fs(p)
    path = path.rstrip("/")
    return {f[len(path) + 1 :]: int(info["size"]) for f, info in fs.find(path, detail=True).items()}


def read_bytes(p) -> bytes:
    if not is_url(p):
        return Path(p).read_bytes()
    fs, path = _fs(p)
    return fs.cat_file(path)


def write_atomic(p, data: bytes) -> None:
    """Write a whole file so that a reader (or a crash) sees the old one or the new one, never a torn one."""
    if is_url(p):
        fs, path = _fs(p)
        fs.pipe_file(path, data)  # one PUT: an object appears whole or not at all
        return
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex}.partial")  # the name the writer's stale-temp-file sweep knows
    tmp.write_bytes(data)
    os.replace(tmp, p)


def remove(p) -> None:
    """Delete one file; nothing if it is missing."""
    try:
        if is_url(p):
            fs, path = _fs(p)
            fs.rm_file(path)
        else:
            os.remove(p)
    except FileNotFoundError:
        pass


def remove_tree(p) -> None:
    """Delete a folder (prefix) and everything below it; nothing if it is missing."""
    if is_url(p):
        fs, path = _fs(p)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def crc32(p) -> str:
    """zlib's CRC-32 of the whole file, 8 hex digits (read in 8 MB blocks)."""
    crc = 0
    if is_url(p):
        fs, path = _fs(p)
        with fs.open(path, "rb") as f:
            while block := f.read(_BLOCK):
                crc = zlib.crc32(block, crc)
    else:
        with open(p, "rb") as f:
            while block := f.read(_BLOCK):
                crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def upload(local: Path, p) -> None:
    """Copy a local file or folder to location p (a local p: copied in place)."""
    local = Path(local)
    if local.is_dir():
        for f in sorted(x for x in local.rglob("*") if x.is_file()):
            write_atomic(join(p, *f.relative_to(local).parts), f.read_bytes())
    else:
        write_atomic(p, local.read_bytes())


def download(p, local: Path) -> Path:
    """Copy the file or folder at location p to the local path `local`; returns it."""
    local = Path(local)
    if not is_url(p):
        raise ValueError("download() is for URLs; a local location is read in place")
    fs, path = _fs(p)
    if fs.isdir(path):
        for f in fs.find(path):
            dst = local.joinpath(*f[len(path) :].strip("/").split("/"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(fs.cat_file(f))
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(fs.cat_file(path))
    return local

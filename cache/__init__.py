"""otkd teacher cache: a Zarr v3 store of the teacher's top-k log-probs (and optional hidden states) per
supervised token, written by Stage 1 and streamed by Stage 2. Layout and row contract: cache/schema.py.

Dependency direction is stages -> pipeline -> cache: nothing here imports pipeline or stages.

The reader and writer (zarr, numpy, torch) are imported on first use of their names: every layer imports
`cache.errors`, and the stage CLIs must answer --help and print a one-line error without loading torch.
"""

import importlib

from cache.errors import CacheError, CacheLockedError, CacheMismatchError, OtkdError

_LAZY = {
    "CacheBlocks": "cache.reader",
    "CacheDataset": "cache.reader",
    "TeacherCache": "cache.reader",
    "describe": "cache.reader",
    "open_cache": "cache.reader",
    "SCHEMA_VERSION": "cache.schema",
    "canonical_meta": "cache.schema",
    "CacheWriter": "cache.writer",
    "store_lease": "cache.lock",
}

__all__ = [
    "CacheWriter",
    "open_cache",
    "TeacherCache",
    "CacheDataset",
    "CacheBlocks",
    "CacheError",
    "CacheLockedError",
    "CacheMismatchError",
    "OtkdError",
    "canonical_meta",
    "describe",
    "store_lease",
    "SCHEMA_VERSION",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

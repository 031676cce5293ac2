"""otkd teacher cache: a Zarr v3 store of the teacher's top-k log-probs (and optional hidden states) per
supervised token, written by Stage 1 and streamed by Stage 2. Layout and row contract: cache/schema.py.

Dependency direction is stages -> pipeline -> cache: nothing here imports pipeline or stages.
"""
from cache.reader import CacheDataset, TeacherCache, describe, open_cache
from cache.errors import CacheError, CacheMismatchError, OtkdError
from cache.schema import SCHEMA_VERSION, canonical_meta
from cache.writer import CacheWriter

__all__ = ["CacheWriter", "open_cache", "TeacherCache", "CacheDataset", "CacheError", "CacheMismatchError", "OtkdError",
           "canonical_meta", "describe", "SCHEMA_VERSION"]

"""The project's user-facing errors. `OtkdError` is the base of every error that a user can fix (a missing
file, a bad parameter, a cache made by another teacher); the stage CLIs print those as one line and keep the
traceback of anything else, so a bug in otkd, torch or transformers is never hidden.

It lives in `cache`, the bottom layer of stages -> pipeline -> cache, so that every layer can raise it.
"""


class OtkdError(Exception):
    """A problem with the user's inputs, files or environment, explained in one line that says what to do."""


class CacheError(OtkdError, ValueError):
    """A teacher cache is missing, incomplete, not a cache, of an unknown schema, or cannot be made with the
    requested cache.* settings."""


class CacheLockedError(CacheError):
    """A cache store is being written by another Stage-1 run (cache/lock.py), or a rank of a multi-rank run
    finds no lease of its own job on it."""


class CacheMismatchError(CacheError):
    """A teacher cache exists but was made from other inputs (teacher, data, parameters) than expected."""


class CacheCorruptError(CacheError):
    """Bytes of a teacher cache changed after they were written (checksum, decoding or row-contract failure);
    the message names the store, array, shard and file and how to repair it (stages.verify_cache --repair)."""

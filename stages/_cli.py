"""What every stage CLI shares: loading params.yaml with overrides, and turning user errors into one line."""

import sys
from contextlib import contextmanager

import typer

from cache.errors import OtkdError
from pipeline.config.base import load_sections

PARAMS = typer.Option("params.yaml", "--params", help="Params file (the one DVC tracks).")
SET = typer.Option([], "--set", help="Override one value, e.g. --set cache.k=32 (repeatable).")


def config(cls, params: str, overrides: list[str], named: dict[str, object]):
    """The sections of params.yaml that the stage's `cls` reads (e.g. CacheParams: seed, data, cache), then --set
    overrides, then the stage's named options (those given on the command line)."""
    extra = [f"{k}={v}" for k, v in named.items() if v is not None]
    return load_sections(cls, params, [*overrides, *extra])


@contextmanager
def clear_errors():
    """User-fixable errors (`OtkdError`) print one line and exit 1 instead of a traceback.

    Only OtkdError: a ValueError, KeyError or FileNotFoundError from torch, transformers or a bug in otkd
    keeps its traceback, which is what it takes to find its cause.
    """
    try:
        yield
    except OtkdError as e:
        msg = str(e).strip() or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(1) from None

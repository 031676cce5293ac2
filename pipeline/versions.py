"""The package versions a result was made with, recorded in every metrics and benchmark results file.

Read from the installed distributions' metadata (nothing is imported, so asking costs nothing): a number can then be
traced to the exact install that produced it, and compared with constraints.txt, which pins the same versions.
"""

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "zarr",
    "numcodecs",
    "numpy",
    "bitsandbytes",
    "accelerate",
    "dvc",
)


def versions() -> dict[str, str]:
    """{"python": "3.11.7", "torch": "2.13.0+cpu", ...}; a package that is not installed is "absent"."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def versions_line() -> str:
    """The same, as one line for Markdown and text results."""
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())

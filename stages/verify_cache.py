"""Verify teacher caches: every file against its manifest, every chunk's checksum, the row contract.

    python -m stages.verify_cache artifacts/cache/train.zarr [more stores] [--quick] [--repair]

Exit code 0: every store is clean and complete; 1: a problem (each listed). --repair drops the completion
records of the bad shards, so that the next `python -m stages.cache_teacher` rewrites exactly those.
"""

import typer

from stages._cli import clear_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    stores: list[str] = typer.Argument(..., help="Cache store(s), e.g. artifacts/cache/train.zarr."),
    quick: bool = typer.Option(False, help="Only stat every file against the manifests' sizes (no reading)."),
    repair: bool = typer.Option(
        False, help="Drop the completion records of bad shards (Stage 1 then rewrites only those)."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar (on stderr)."),
):
    """Check each store; print a one-screen report per store; exit 1 if any has a problem."""
    with clear_errors():
        from cache import verify  # imported late so --help answers at once

        clean = True
        for store in stores:
            report = verify.verify(store, quick=quick, progress=progress)
            print(report.text())
            if repair:
                for line in verify.repair(store, report) or ["repair: nothing to repair"]:
                    print(f"repair: {line}" if not line.startswith("repair:") else line)
            clean &= report.ok
    raise typer.Exit(0 if clean else 1)


if __name__ == "__main__":
    app()

"""``kiln export RUN... --format torchscript|exported|onnx|torchserve``: a file plus a parity check.

Reads the run's ``model.safetensors`` (several runs make one ensemble model), exports it with
:func:`kiln.deploy.export.export_runs` to ``RUN/export/FORMAT/`` (or ``--out``), and prints the
file, its size and the parity table (exported vs eager on test inputs at two batch sizes).
``manifest.json`` next to the file records the same numbers. ``torchserve`` makes the
``exported`` file, then packs it with a generated handler into a TorchServe ``.mar``
(:func:`kiln.deploy.torchserve.archive.export_torchserve`) and prints the commands that serve it.

Torch is imported inside the function, so ``kiln --help`` stays fast.

Example:
    >>> run_export(["runs/digits"], format="onnx", fuse=False, out=None)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kiln.cli.common import Debug, TrustCode

if TYPE_CHECKING:
    from kiln.deploy.export import ExportResult

__all__ = ["command", "register", "run_export"]

# kiln.deploy.export.FORMATS (without importing torch), plus the TorchServe archive.
_FORMATS = ("torchscript", "exported", "onnx", "torchserve")


def command(
    runs: Annotated[list[str], typer.Argument(help="run directory (several = one ensemble model)")],
    format: Annotated[
        str, typer.Option("--format", help="torchscript, exported, onnx or torchserve")
    ] = "exported",
    fuse: Annotated[
        bool, typer.Option("--fuse", help="fold conv-bn and linear chains first")
    ] = False,
    out: Annotated[
        str | None, typer.Option(help="output folder (default: RUN/export/FORMAT)")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Export a trained run to TorchScript, torch.export (.pt2) or ONNX, with a parity check."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_export(runs, format=format, fuse=fuse, out=out, trust_code=trust_code),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln export`` to ``app``."""
    app.command("export")(command)


def _size(n: int) -> str:
    """Bytes as a short human-readable size."""
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


# A file name given to --out (a folder) would silently become a folder of that name.
_FILE_SUFFIXES = (".onnx", ".pt", ".pt2", ".mar", ".ts", ".pth", ".safetensors", ".zip")


def _check_out_folder(out: str | None) -> None:
    if out is not None and Path(out).suffix.lower() in _FILE_SUFFIXES and not Path(out).is_dir():
        from kiln.errors import UsageError

        raise UsageError(
            f"--out names a folder, got the file name {out!r}: the export writes its model file "
            f"and manifest.json into it; use --out {Path(out).parent / Path(out).stem!s}"
        )


def run_export(
    runs: list[str], *, format: str, fuse: bool, out: str | None, trust_code: bool = False
) -> Path:
    """Export the run(s), print the file, size and parity table; returns the model file.

    ``torchserve`` returns the ``.mar`` archive instead of the model file.

    Raises:
        ValueError: unknown format (the message lists the allowed ones), incompatible runs,
            or a parity failure.
        FileNotFoundError: a run directory is missing or incomplete.
        ImportError: ``torchserve`` without torch-model-archiver installed.
    """
    if format not in _FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(_FORMATS)}")
    _check_out_folder(out)
    if format == "torchserve":
        return _run_torchserve(runs, fuse=fuse, out=out, trust_code=trust_code)
    from kiln.deploy.export import export_runs

    result = export_runs(runs, format=format, fuse=fuse, out=out, trust_code=trust_code)
    _print_result(result, fuse=fuse)
    return result.path


def _run_torchserve(
    runs: list[str], *, fuse: bool, out: str | None, trust_code: bool = False
) -> Path:
    """Export, pack the TorchServe archive and print how to serve it; returns the ``.mar``."""
    from kiln.deploy.torchserve.archive import export_torchserve, start_commands

    ts = export_torchserve(runs, fuse=fuse, out=out, trust_code=trust_code)
    _print_result(ts.export, fuse=fuse)
    print(f"torchserve archive: {ts.archive} ({_size(ts.archive.stat().st_size)})")
    print(f"handler: {ts.handler} (needs torch only; answers like kiln serve)")
    print("serve it with TorchServe (Java 17; --foreground keeps it attached to the terminal):")
    for line in start_commands(ts).splitlines():
        print(f"  {line}")
    return ts.archive


def _print_result(result: ExportResult, *, fuse: bool) -> None:
    """The file, its size, the method, the fusion and the parity table."""
    print(f"{result.format}: {result.path} ({_size(result.bytes)})")
    method = result.notes.get("method")
    if method:
        print(f"method: torch.jit.{method}")
    if fuse:
        print(f"fused: {result.manifest['options'].get('fused', 'nothing fused')}")
    tol = result.manifest["tolerance"]
    print(f"parity vs eager (tolerance {tol['atol']:g} abs + {tol['rtol']:g} x max|output|):")
    print(f"  {'batch':>5}  {'max abs':>10}  {'max rel':>10}  ok")
    for p in result.parity:
        print(f"  {p.batch:>5}  {p.max_abs:>10.2e}  {p.max_rel:>10.2e}  {'yes' if p.ok else 'NO'}")
    print(f"manifest: {result.path.parent / 'manifest.json'}")

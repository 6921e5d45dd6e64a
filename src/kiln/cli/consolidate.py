"""``kiln consolidate RUN|CHECKPOINT [--out FILE]``: one ``.safetensors`` from a checkpoint.

A run directory stands for its last checkpoint; an FSDP2-sharded checkpoint is gathered into
full tensors. The weights file goes next to the checkpoint unless ``--out`` names another.
Torch is imported inside the function, so ``kiln --help`` stays fast.

Example:
    >>> run_consolidate("runs/digits", out=None)                        # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.common import Debug, TrustCode

__all__ = ["command", "register", "run_consolidate"]


def command(
    checkpoint: Annotated[str, typer.Argument(help="a run directory or a step-N.ckpt file")],
    out: Annotated[
        str | None, typer.Option(help="output .safetensors (default: next to the checkpoint)")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Turn a checkpoint (FSDP2-sharded or not) into one .safetensors weights file."""
    from kiln.cli.errors import run_cli

    run_cli(lambda: run_consolidate(checkpoint, out=out, trust_code=trust_code), debug=debug)


def register(app: typer.Typer) -> None:
    """Add ``kiln consolidate`` to ``app``."""
    app.command("consolidate")(command)


def run_consolidate(checkpoint: str, *, out: str | None, trust_code: bool = False) -> Path:
    """Write the weights of ``checkpoint`` to one ``.safetensors`` file; returns its path.

    Raises:
        kiln.errors.UsageError: the folder of ``out`` does not exist.
        kiln.train.checkpoint.CheckpointError: no checkpoint there, or one that is refused.
    """
    from kiln.errors import UsageError
    from kiln.train.checkpoint import resolve_checkpoint
    from kiln.train.checkpoint.weights import consolidate_checkpoint

    path = resolve_checkpoint(checkpoint)
    target = Path(out) if out else path.with_suffix(".safetensors")
    if not target.parent.is_dir():
        raise UsageError(
            f"--out {target}: folder {target.parent} does not exist; create it or choose "
            "another --out"
        )
    weights = consolidate_checkpoint(path, out=target, trust_code=trust_code)
    print(f"{len(weights)} tensors from {path} -> {target}")
    return target

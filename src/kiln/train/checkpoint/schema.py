"""What a checkpoint holds: its top-level keys, its format version, and the errors for bad ones.

A checkpoint is a dict of named state (DESIGN.md rule 5): the unwrapped ``model`` and
``optimizer`` (or ``sharded``, the name of an FSDP2 shard folder beside it), ``scheduler``,
``engine`` (scaler, counters), ``rng`` (every rank's RNG states), ``loop`` (epoch, batch, step,
...), ``techniques`` (EMA, SWA, ...), ``best`` and the resolved ``config``. Every file that
:func:`~kiln.train.checkpoint.files.save_checkpoint` writes also carries
``format_version`` (:data:`FORMAT_VERSION`) and the ``kiln_version`` that wrote it, so a file from
a newer Kiln whose layout this one does not know is refused with a message naming that version
instead of being misread. Files written before versioning have neither key and load as format 0.

Example:
    >>> stamped = stamp({"model": {}})
    >>> stamped["format_version"] == FORMAT_VERSION
    True
    >>> check_version("step-1.ckpt", stamped)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.errors import CorruptFileError, KilnError, UnsafeFileError


class CheckpointError(KilnError, RuntimeError):
    """A checkpoint is missing, corrupt or unsafe; the message says which and what to do."""


class CorruptCheckpointError(CheckpointError, CorruptFileError):
    """A checkpoint file is damaged: truncated, not a torch file, or missing what Kiln saves."""


class UnsafeCheckpointError(CheckpointError, UnsafeFileError):
    """A checkpoint would run code, import something, or point outside its folder."""


#: The layout of the checkpoint dict this Kiln writes. Raise it when a key changes meaning or
#: becomes required, and teach :func:`~kiln.train.checkpoint.files.load_checkpoint` to read the
#: older layouts it still accepts.
FORMAT_VERSION = 1
FORMAT_KEY = "format_version"
WRITER_KEY = "kiln_version"
#: What every checkpoint the Trainer writes holds (besides ``model``/``optimizer`` or
#: ``sharded``); ``resume=`` needs all of it.
RESUME_KEYS = ("config", "loop", "engine", "rng")
#: What rebuilding the model's weights needs (``kiln consolidate``, ``eval --checkpoint``).
WEIGHT_KEYS = ("config",)


def stamp(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` plus the format version and the Kiln version writing it (a new dict)."""
    from kiln import __version__

    return {**state, FORMAT_KEY: FORMAT_VERSION, WRITER_KEY: __version__}


def check_version(path: str | Path, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint written in a format newer than this Kiln reads.

    Raises:
        CheckpointError: the file's ``format_version`` is above :data:`FORMAT_VERSION` (the
            message names the version and the Kiln that wrote it); a corrupt one when the
            version is not a whole number.
    """
    version = state.get(FORMAT_KEY, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: its {FORMAT_KEY} is {str(version)[:40]!r}, not a "
            "format number; resume from an earlier checkpoint in the same folder"
        )
    if version > FORMAT_VERSION:
        from kiln import __version__

        writer = state.get(WRITER_KEY)
        by = f"Kiln {str(writer)[:40]}" if writer is not None else "a newer Kiln"
        raise CheckpointError(
            f"checkpoint {path} was written by {by} in checkpoint format {version}; this Kiln "
            f"({__version__}) reads formats up to {FORMAT_VERSION}: upgrade Kiln to load it"
        )


def check_keys(p: Path, state: dict[str, Any], require: Sequence[str], fix: str) -> None:
    """Refuse a checkpoint that lacks (or mistypes) what a Kiln checkpoint holds."""
    missing = [k for k in require if k not in state]
    if "model" not in state and "sharded" not in state:
        missing.append("model")
    if "loop" in require and "sharded" not in state and "optimizer" not in state:
        missing.append("optimizer")
    if missing:
        raise CorruptCheckpointError(
            f"checkpoint {p} is corrupt or not a Kiln checkpoint: it lacks "
            f"{', '.join(repr(k) for k in missing)}{fix}"
        )
    wrong: list[str] = [
        k
        for k in ("model", "optimizer", "config", "loop", "engine")
        if k in state and not isinstance(state[k], Mapping)
    ]
    loop = state.get("loop")
    if isinstance(loop, Mapping) and not all(
        isinstance(loop.get(k), int) for k in ("epoch", "batch", "step")
    ):
        wrong.append("loop (epoch, batch, step)")
    if "rng" in state and not isinstance(state["rng"], (list, Mapping)):
        wrong.append("rng")
    if wrong:
        raise CorruptCheckpointError(
            f"checkpoint {p} is corrupt: {', '.join(wrong)} do not hold what Kiln saves there{fix}"
        )


def plain_name(name: str) -> bool:
    """A bare file name (no folder part, not ``.``/``..``): what pointers and shard names hold."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")

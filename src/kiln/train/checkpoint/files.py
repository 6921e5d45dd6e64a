"""Checkpoint files: atomic writes, orphan clean-up, and safe loading.

A checkpoint is written to a temp file beside its name, fsynced and renamed, so a crash or a full
disk never leaves a half-written ``step-N.ckpt`` (:func:`atomic_write`); temp files of writers that
died are removed (:func:`remove_orphans`). Loading uses ``torch.load(weights_only=True)`` behind
Kiln's size checks: a file that would run code when unpickled is refused, and so is one written in
a newer checkpoint format (see :mod:`kiln.train.checkpoint.schema`).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> state = {"model": {"w": torch.ones(2)}}
    >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "step-1.ckpt", state)
    >>> load_checkpoint(p)["model"]["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.errors import CorruptFileError, DiskError, UnsafeFileError
from kiln.train.checkpoint.schema import (
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    check_keys,
    check_version,
    plain_name,
    stamp,
)

#: Orphans of a killed :func:`atomic_write`: ``.<name>.tmp-<pid>``.
_TMP = re.compile(r"^\..+\.tmp-(\d+)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    The old ``path`` is untouched until the rename, so a crash or a full disk leaves it whole.

    Raises:
        DiskError: the disk is full or the folder is not writable (the temp file is removed).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(exc, path) from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _disk_error(exc, path) from None
    except RuntimeError as exc:
        # torch.save reports a failed write as "[enforce fail at inline_container.cc:NNN]
        # ... file write failed"; the OSError behind it (ENOSPC) is not attached.
        if "inline_container" not in str(exc) and "write failed" not in str(exc):
            raise
        raise _disk_error(OSError(errno.ENOSPC, "file write failed"), path) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _disk_error(exc: OSError, path: Path) -> OSError:
    """A :class:`DiskError` for a full or unwritable disk; other errors are returned as they are."""
    if exc.errno in _DISK_FULL:
        return DiskError(
            f"the disk is full writing {path}: free space (or set out_dir= to another disk) "
            "and resume; nothing earlier was overwritten"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(
            f"cannot write {path}: {exc.strerror or 'permission denied'}; make the folder "
            "writable or set out_dir= to a writable folder"
        )
    return exc


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete temp files (``.<name>.tmp-<pid>``) left by writes whose process is gone.

    A write killed mid-way leaves its temp file behind; a live writer's file (another process of
    this run) is kept.

    Example:
        >>> import tempfile
        >>> remove_orphans(tempfile.mkdtemp())
        []
    """
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for entry in d.iterdir():
        match = _TMP.match(entry.name)
        if match and entry.is_file() and not _alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's live process, or a number that is not a pid: keep it
    return True


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` to ``path``, stamped with the format version."""
    p = Path(path)
    stamped = stamp(state)
    atomic_write(p, lambda f: torch.save(stamped, f))
    return p


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    require: Sequence[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse anything that is not plain state.

    The file is checked before torch reads it (archive sizes, see :mod:`kiln.safeio.torchfile`);
    a checkpoint that names a shard folder (FSDP2) has that folder's DCP metadata read with a
    restricted unpickler (:mod:`kiln.safeio.dcp`) here, before anything hands it to DCP.

    Args:
        path: the ``.ckpt`` file.
        map_location: where tensors go.
        require: top-level keys that must be there (:data:`RESUME_KEYS`, :data:`WEIGHT_KEYS`);
            the model's weights (``model`` or ``sharded``) are required with any of them.

    Raises:
        CheckpointError: missing, or written in a newer format; :class:`CorruptCheckpointError`
            for a truncated or damaged file or missing keys; :class:`UnsafeCheckpointError` for
            a file that would run code.
    """
    from kiln.safeio.torchfile import torch_load

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    fix = "; resume from an earlier checkpoint in the same folder"
    try:
        state = torch_load(p, map_location=map_location)
    except UnsafeFileError as exc:
        raise UnsafeCheckpointError(str(exc)) from None
    except CorruptFileError as exc:
        raise CorruptCheckpointError(f"checkpoint {exc}{fix}") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"{p} holds a {type(state).__name__}, not a Kiln checkpoint dict{fix}"
        )
    check_version(p, state)
    if require:
        check_keys(p, state, require, fix)
    if "sharded" in state:
        _check_shards(p, state["sharded"])
    return state


def _check_shards(p: Path, name: Any) -> None:
    """The shard folder a checkpoint names is a plain folder beside it with safe DCP metadata."""
    from kiln.safeio.dcp import read_metadata

    if not isinstance(name, str) or not plain_name(name):
        raise UnsafeCheckpointError(
            f"refused to load {p}: its shard folder {str(name)[:80]!r} is not a folder beside "
            "the checkpoint; only use checkpoints you wrote"
        )
    try:
        read_metadata(p.parent / name)
    except UnsafeFileError as exc:
        raise UnsafeCheckpointError(str(exc)) from None
    except CorruptFileError as exc:
        raise CorruptCheckpointError(str(exc)) from None

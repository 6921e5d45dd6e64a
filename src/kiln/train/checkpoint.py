"""Checkpoints: atomic full-state saves, keep-last/keep-best rotation, safe loading.

A checkpoint is a dict of named state (DESIGN.md rule 5): the unwrapped model, optimizer,
scheduler, engine (scaler, counters), every RNG, the loader position and the resolved config.
It is written to a temp file, fsynced and renamed, so a crash never leaves a half-written
``step-N.ckpt``; pointer files ``last`` and ``best`` name the current ones. Loading uses
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.

Model weights for the other verbs go to ``model.safetensors`` (no pickle at all).

Example:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> ckpts = CheckpointManager(d, keep_last=2)
    >>> p = ckpts.save({"model": {"w": torch.ones(2)}}, step=10)
    >>> load_checkpoint(resolve_checkpoint(d))["model"]["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.errors import CorruptFileError, DiskError, KilnError, UnsafeFileError

CKPT_SUFFIX = ".ckpt"


class CheckpointError(KilnError, RuntimeError):
    """A checkpoint is missing, corrupt or unsafe; the message says which and what to do."""


class CorruptCheckpointError(CheckpointError, CorruptFileError):
    """A checkpoint file is damaged: truncated, not a torch file, or missing what Kiln saves."""


class UnsafeCheckpointError(CheckpointError, UnsafeFileError):
    """A checkpoint would run code, import something, or point outside its folder."""


#: What every checkpoint the Trainer writes holds (besides ``model``/``optimizer`` or
#: ``sharded``); ``resume=`` needs all of it.
RESUME_KEYS = ("config", "loop", "engine", "rng")
#: What rebuilding the model's weights needs (``kiln consolidate``, ``eval --checkpoint``).
WEIGHT_KEYS = ("config",)
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
    """Atomically ``torch.save`` ``state`` to ``path``."""
    p = Path(path)
    atomic_write(p, lambda f: torch.save(state, f))
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
        CheckpointError: missing; :class:`CorruptCheckpointError` for a truncated or damaged
            file or missing keys; :class:`UnsafeCheckpointError` for a file that would run code.
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
    if require:
        _check_keys(p, state, require, fix)
    if "sharded" in state:
        _check_shards(p, state["sharded"])
    return state


def _check_keys(p: Path, state: dict[str, Any], require: Sequence[str], fix: str) -> None:
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


def _check_shards(p: Path, name: Any) -> None:
    """The shard folder a checkpoint names is a plain folder beside it with safe DCP metadata."""
    from kiln.safeio.dcp import read_metadata

    if not isinstance(name, str) or not _plain_name(name):
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


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def resolve_checkpoint(path: str | Path) -> Path:
    """Turn a run dir, a checkpoints dir or a file into the checkpoint file to load.

    A run directory resolves to ``<run>/checkpoints/last``'s target.
    """
    p = Path(path)
    if p.is_file():
        if p.name in ("last", "best"):
            return _follow(p)
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    for d in (p / "checkpoints", p):
        pointer = d / "last"
        if pointer.is_file():
            return _follow(pointer)
    found = sorted(p.glob(f"**/*{CKPT_SUFFIX}"))
    if found:
        return max(found, key=_step_of)
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir():
        raise CheckpointError(
            f"nothing to resume: {p} has no finished checkpoint (the run stopped before its "
            "first checkpoint was written); start it again without resume="
        )
    raise CheckpointError(f"no checkpoint in {p} (expected checkpoints/last or *.ckpt files)")


def _follow(pointer: Path) -> Path:
    """The checkpoint a ``last``/``best`` pointer names, which must sit in the pointer's folder."""
    folder = pointer.parent
    if pointer.is_symlink():
        name = os.readlink(pointer)
    else:
        if pointer.stat().st_size > 4096:
            raise CorruptCheckpointError(
                f"{pointer} is corrupt: a pointer file holds one checkpoint name; delete it and "
                "pass the step-N.ckpt file to resume from"
            )
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            name = ""
        if not name:
            raise CorruptCheckpointError(
                f"{pointer} is corrupt (empty or not text); pass the step-N.ckpt file instead"
            )
    target = (folder / name).resolve()
    if target.parent != folder.resolve():
        raise UnsafeCheckpointError(
            f"refused to follow {pointer}: it points to {name[:80]!r}, outside {folder}; "
            "a pointer names a checkpoint in its own folder (pass the step-N.ckpt file instead)"
        )
    if not target.is_file():
        raise CheckpointError(f"{pointer} points to {target.name}, which does not exist")
    return folder / target.name


def _step_of(p: Path) -> int:
    try:
        return int(p.stem.split("-")[-1])
    except ValueError:
        return -1


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        index = None
    ok = (
        isinstance(index, dict)
        and isinstance(index.get("saved"), list)
        and isinstance(index.get("scores"), dict)
        and all(isinstance(n, str) and _plain_name(n) for n in index["saved"])
    )
    if not ok:
        raise CorruptCheckpointError(
            f"{path} is corrupt; delete it (the step-N.ckpt files beside it stay valid) and "
            "run again"
        )
    return index


class CheckpointManager:
    """Writes ``step-N.ckpt`` files, keeps the last N and the best N, maintains pointers.

    Args:
        directory: where checkpoints go (``<run>/checkpoints``).
        keep_last: most recent checkpoints kept.
        keep_best: best checkpoints kept by ``metric`` (0 = none).
        mode: ``min`` or ``max`` for the metric.
    """

    def __init__(
        self, directory: str | Path, *, keep_last: int = 2, keep_best: int = 1, mode: str = "min"
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.mode = mode
        self.index_path = self.dir / "index.json"
        self.index: dict[str, Any] = {"saved": [], "scores": {}}
        remove_orphans(self.dir)
        if self.index_path.is_file():
            self.index = _read_index(self.index_path)

    def save(self, state: dict[str, Any], *, step: int, metric: float | None = None) -> Path:
        """Save ``state`` as ``step-<step>.ckpt``, update pointers, and prune old files."""
        name = f"step-{step}{CKPT_SUFFIX}"
        try:
            path = save_checkpoint(self.dir / name, state)
        except DiskError as exc:
            prev = self.last()
            kept = f"the previous checkpoint {prev} is intact" if prev else "no checkpoint yet"
            raise DiskError(f"{exc}; {kept}") from None
        if name in self.index["saved"]:
            self.index["saved"].remove(name)
        self.index["saved"].append(name)
        if metric is not None and math.isfinite(metric):
            self.index["scores"][name] = metric
        self._write_pointer("last", name)
        self._prune()
        best = self.best_name()
        if best is not None and (self.dir / best).is_file():
            self._write_pointer("best", best)
        atomic_write(self.index_path, lambda f: f.write(json.dumps(self.index).encode()))
        return path

    def last(self) -> Path | None:
        """The most recently saved checkpoint file, or None before the first save."""
        saved = self.index["saved"]
        return self.dir / saved[-1] if saved and (self.dir / saved[-1]).is_file() else None

    def best_name(self) -> str | None:
        scores: dict[str, float] = self.index["scores"]
        if not scores:
            return None
        pick = min if self.mode == "min" else max
        return pick(scores, key=lambda k: scores[k])

    def _ranked_best(self) -> list[str]:
        scores: dict[str, float] = self.index["scores"]
        return sorted(scores, key=lambda k: scores[k], reverse=self.mode == "max")

    def _write_pointer(self, pointer: str, name: str) -> None:
        atomic_write(self.dir / pointer, lambda f: f.write(name.encode()))

    def _prune(self) -> None:
        keep = set(self.index["saved"][-self.keep_last :])
        keep.update(self._ranked_best()[: self.keep_best])
        for name in list(self.index["saved"]):
            if name not in keep:
                (self.dir / name).unlink(missing_ok=True)
                shards = self.dir / name.replace(CKPT_SUFFIX, ".dcp")  # FSDP2's shard folder
                if shards.is_dir():
                    shutil.rmtree(shards)
                self.index["saved"].remove(name)
                self.index["scores"].pop(name, None)

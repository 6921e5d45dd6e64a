"""A run's ``checkpoints/`` folder: ``step-N.ckpt`` files, keep-last/keep-best, pointers.

:class:`CheckpointManager` writes ``step-N.ckpt`` (through
:func:`~kiln.train.checkpoint.files.save_checkpoint`), keeps the last N and the best N by a
metric, and maintains the pointer files ``last`` and ``best`` and ``index.json`` (what was
saved, with scores). :func:`resolve_checkpoint` reads them back: a run directory, a
``checkpoints`` folder, a pointer or a file becomes the checkpoint file to load; a pointer that
names a file outside its folder is refused.

Example:
    >>> import tempfile, torch
    >>> from kiln.train.checkpoint.files import load_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> ckpts = CheckpointManager(d, keep_last=2)
    >>> p = ckpts.save({"model": {"w": torch.ones(2)}}, step=10)
    >>> load_checkpoint(resolve_checkpoint(d))["model"]["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from kiln.errors import DiskError, UsageError
from kiln.run import CHECKPOINTS, CONFIG
from kiln.train.checkpoint.files import atomic_write, remove_orphans, save_checkpoint
from kiln.train.checkpoint.schema import (
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    plain_name,
)

CKPT_SUFFIX = ".ckpt"


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
    for d in (p / CHECKPOINTS, p):
        pointer = d / "last"
        if pointer.is_file():
            return _follow(pointer)
    found = sorted(p.glob(f"**/*{CKPT_SUFFIX}"))
    if found:
        return max(found, key=_step_of)
    if (p / CONFIG).is_file() or (p / CHECKPOINTS).is_dir():
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
        and all(isinstance(n, str) and plain_name(n) for n in index["saved"])
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
        # keep_last=0 would keep every file (``saved[-0:]`` is the whole list), not none.
        if keep_last < 1 or keep_best < 0:
            raise UsageError(
                f"keep_last must be >= 1 and keep_best >= 0, got keep_last={keep_last}, "
                f"keep_best={keep_best}; the checkpoint a run resumes from is always kept"
            )
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

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

import json
import math
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError

CKPT_SUFFIX = ".ckpt"


class CheckpointError(KilnError, RuntimeError):
    """A checkpoint is missing, corrupt or unsafe; the message says which and what to do."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` to ``path``."""
    p = Path(path)
    atomic_write(p, lambda f: torch.save(state, f))
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse anything that is not plain state.

    Raises:
        CheckpointError: missing, truncated/corrupt, or containing executable pickle payloads.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():
            # A plain pickle (protocol != 2) warns before it is refused below: say it once.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"refused to load {p}: it contains Python objects that would run code when "
            f"unpickled, so it is not a plain Kiln checkpoint ({first[:160]}). Kiln loads with "
            "weights_only=True and never executes such files; only load files you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {p} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); resume from an earlier "
            "checkpoint in the same folder"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p} holds a {type(state).__name__}, not a Kiln checkpoint dict")
    return state


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
    raise CheckpointError(f"no checkpoint in {p} (expected checkpoints/last or *.ckpt files)")


def _follow(pointer: Path) -> Path:
    target = pointer.parent / pointer.read_text().strip()
    if not target.is_file():
        raise CheckpointError(f"{pointer} points to {target.name}, which does not exist")
    return target


def _step_of(p: Path) -> int:
    try:
        return int(p.stem.split("-")[-1])
    except ValueError:
        return -1


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
        if self.index_path.is_file():
            self.index = json.loads(self.index_path.read_text())

    def save(self, state: dict[str, Any], *, step: int, metric: float | None = None) -> Path:
        """Save ``state`` as ``step-<step>.ckpt``, update pointers, and prune old files."""
        name = f"step-{step}{CKPT_SUFFIX}"
        path = save_checkpoint(self.dir / name, state)
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

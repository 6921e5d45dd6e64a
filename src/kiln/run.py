"""The run directory: the contract between ``kiln train`` and every verb that reads a run.

A run directory holds what the other verbs (eval, export, quantize, prune, serve, inspect,
report, resume) need to rebuild and use the trained model on raw inputs::

    runs/<name>/
      config.yaml          the resolved config (every default written out)
      data_info.json       the input contract: task, input shape, classes, normalisation
      metrics.jsonl        one JSON object per logged step/epoch
      checkpoints/         step-<N>.ckpt (full state), last, best, index.json
      model.safetensors    the weights of the best model, with the config as metadata
      summary.json         written when the fit finished: steps, metrics, best checkpoint

This module names those paths and reads them (the config, the input contract, the weights
file, the status); it imports neither torch nor the training code, so every layer may use it.
Reading a checkpoint's content is :mod:`kiln.train.checkpoint`'s job.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / CONFIG).write_text("name: x\\n")
    >>> run_dir_of(d) == d, status(d).finished
    (True, False)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.config import Config
    from kiln.data.base import DataInfo

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "DATA_INFO",
    "METRICS",
    "SUMMARY",
    "WEIGHTS",
    "RunStatus",
    "checkpoint_files",
    "data_info_from_dict",
    "data_info_from_json",
    "read_config",
    "read_data_info",
    "read_summary",
    "run_dir_of",
    "run_dir_of_checkpoint",
    "status",
    "weights_file",
    "write_run_files",
]

CONFIG = "config.yaml"
"""The resolved config of the run."""
DATA_INFO = "data_info.json"
"""The input contract (:class:`kiln.data.base.DataInfo` as JSON)."""
METRICS = "metrics.jsonl"
"""One JSON object per logged step or epoch."""
CHECKPOINTS = "checkpoints"
"""The folder of full-state checkpoints (see :mod:`kiln.train.checkpoint`)."""
WEIGHTS = "model.safetensors"
"""The final (best) weights, with the config and the input contract as metadata."""
SUMMARY = "summary.json"
"""Written once the fit finished."""


def run_dir_of(run: str | Path) -> Path:
    """A run directory from a run directory or a file inside it (``model.safetensors``).

    Raises:
        FileNotFoundError: the folder has no ``config.yaml``.

    Example:
        >>> run_dir_of("runs/digits/model.safetensors")   # doctest: +SKIP
        PosixPath('runs/digits')
    """
    p = Path(run)
    if p.is_file():
        p = p.parent
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(f"not a Kiln run directory (no config.yaml): {p}")
    return p


def run_dir_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file belongs to, or None for a loose file.

    Example:
        >>> run_dir_of_checkpoint(Path("runs/x/checkpoints/step-4.ckpt"))
        PosixPath('runs/x')
        >>> run_dir_of_checkpoint(Path("elsewhere/step-4.ckpt")) is None
        True
    """
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def read_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The run's resolved config (``config.yaml``), with optional dotted overrides.

    Raises:
        kiln.config.ConfigError: the file is missing or invalid (naming it).

    Example:
        >>> cfg = read_config("runs/digits")   # doctest: +SKIP
    """
    from kiln.config import load_config

    return load_config(Path(run_dir) / CONFIG, overrides)


def write_run_files(run_dir: Path, cfg: Config, info: DataInfo) -> None:
    """Write the resolved config and the input contract, for the other verbs.

    Example:
        >>> write_run_files(Path("runs/x"), cfg, data.info)   # doctest: +SKIP
    """
    from kiln.config import dump_config

    (run_dir / CONFIG).write_text(dump_config(cfg))
    (run_dir / DATA_INFO).write_text(json.dumps(asdict(info), indent=1))


def data_info_from_dict(raw: Mapping[str, Any]) -> DataInfo:
    """A :class:`~kiln.data.base.DataInfo` from its JSON form (``input_shape`` back to a tuple).

    Example:
        >>> data_info_from_dict({"task": "regression", "input_shape": [3]}).input_shape
        (3,)
    """
    from kiln.data.base import DataInfo

    fields = dict(raw)
    fields["input_shape"] = tuple(fields["input_shape"])  # JSON has no tuples
    return DataInfo(**fields)


def data_info_from_json(text: str) -> DataInfo:
    """A :class:`~kiln.data.base.DataInfo` from ``data_info.json`` text or weights metadata.

    Example:
        >>> data_info_from_json('{"task": "lm", "input_shape": [8]}').task
        'lm'
    """
    return data_info_from_dict(json.loads(text))


def read_data_info(run_dir: str | Path, *, hint: str | None = None) -> DataInfo:
    """The run's input contract (``data_info.json``).

    Args:
        run_dir: the run directory.
        hint: what to say after "is missing;" (by default: is this a complete run directory?).

    Raises:
        FileNotFoundError: the file is missing.

    Example:
        >>> read_data_info("runs/digits").num_classes   # doctest: +SKIP
        10
    """
    run_dir = Path(run_dir)
    file = run_dir / DATA_INFO
    if not file.is_file():
        why = hint or f"is {run_dir} a complete Kiln run directory?"
        raise FileNotFoundError(f"{file} is missing; {why}")
    return data_info_from_json(file.read_text())


def weights_file(run: str | Path) -> Path:
    """The ``model.safetensors`` of a run directory (or the weights file itself).

    Raises:
        FileNotFoundError: no weights there (the run may not have finished; use its checkpoint).

    Example:
        >>> weights_file("runs/digits")   # doctest: +SKIP
        PosixPath('runs/digits/model.safetensors')
    """
    p = Path(run)
    file = p / WEIGHTS if p.is_dir() else p
    if not file.is_file():
        # In a run directory the exact command is known; elsewhere only its shape.
        config, run_dir = (p / CONFIG, p) if (p / CONFIG).is_file() else ("<config>", "<run>")
        raise FileNotFoundError(
            f"no {WEIGHTS} in {p}; the run may not have finished: resume it with "
            f"`kiln train {config} resume={run_dir}`"
        )
    return file


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``run_dir/summary.json``, or None when it is missing or unreadable.

    Example:
        >>> read_summary("no/such/run") is None
        True
    """
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The run's ``step-<N>.ckpt`` files, oldest (lowest step) first; ``[]`` when there are none.

    Example:
        >>> checkpoint_files("no/such/run")
        []
    """
    folder = Path(run_dir) / CHECKPOINTS

    def step(p: Path) -> int:
        try:
            return int(p.stem.removeprefix("step-"))
        except ValueError:
            return -1

    return sorted((p for p in folder.glob("step-*.ckpt") if step(p) >= 0), key=step)


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands, from the files in its directory (nothing is loaded).

    Attributes:
        run_dir: the run directory.
        finished: ``summary.json`` was written (the fit ended; early stops included).
        has_weights: ``model.safetensors`` exists (the verbs that read weights can use it).
        checkpoints: the ``step-<N>.ckpt`` files, oldest first.
    """

    run_dir: Path
    finished: bool
    has_weights: bool
    checkpoints: Sequence[Path]

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint (highest step), or None before the first one was written."""
        return self.checkpoints[-1] if self.checkpoints else None


def status(run: str | Path) -> RunStatus:
    """Whether a run finished, has its weights, and which checkpoints it kept.

    Raises:
        FileNotFoundError: ``run`` is not a run directory (no ``config.yaml``).

    Example:
        >>> s = status("runs/digits")   # doctest: +SKIP
        >>> s.finished, s.last_checkpoint   # doctest: +SKIP
        (True, PosixPath('runs/digits/checkpoints/step-96.ckpt'))
    """
    run_dir = run_dir_of(run)
    return RunStatus(
        run_dir=run_dir,
        finished=read_summary(run_dir) is not None,
        has_weights=(run_dir / WEIGHTS).is_file(),
        checkpoints=tuple(checkpoint_files(run_dir)),
    )

"""Model loading for :mod:`kiln.deploy.serve`: run directories, ``.pt2`` and ``.onnx`` files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.data.base import DataInfo

__all__ = ["Backend", "load_backend"]


@dataclass
class Backend:
    """A model to serve: a batch predict function and what its data looks like."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    info: DataInfo
    kind: str
    source: str


def _read_info(run_dir: Path) -> DataInfo:
    """The run's ``data_info.json``."""
    file = run_dir / "data_info.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; serve needs the run's data description")
    raw = json.loads(file.read_text())
    raw["input_shape"] = tuple(raw["input_shape"])
    return DataInfo(**raw)


def _exported_info(path: Path) -> DataInfo:
    """The data description of an exported file, via its manifest's source run."""
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        sources = json.loads(manifest.read_text()).get("sources") or []
        for src in sources:
            if (Path(src) / "data_info.json").is_file():
                return _read_info(Path(src))
    for parent in path.parents:
        if (parent / "data_info.json").is_file():
            return _read_info(parent)
    raise FileNotFoundError(
        f"cannot find the data description of {path}: no manifest.json naming its run and no "
        "data_info.json in a parent folder; export it with `kiln export RUN`"
    )


def load_backend(target: str | Path) -> Backend:
    """Load what ``target`` names: a run directory (eager), a ``.pt2`` or an ``.onnx`` file.

    Raises:
        FileNotFoundError: the target or its data description is missing.
        ValueError: the target is not a run directory, ``.pt2`` or ``.onnx`` file, or its task
            cannot be served yet (``lm``).
    """
    p = Path(target)
    if p.is_dir():
        from kiln.train.weights import load_model

        info = _read_info(p)
        model = load_model(p)
        predict: Callable[[torch.Tensor], torch.Tensor] = model
        kind = "eager"
    elif p.is_file() and p.suffix in (".pt2", ".onnx"):
        from kiln.deploy.export import load_exported

        info = _exported_info(p)
        kind = "onnx" if p.suffix == ".onnx" else "exported"
        predict = load_exported(p, kind)
    elif not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a run directory or a .pt2/.onnx file")
    else:
        raise ValueError(
            f"cannot serve {p}: pass a run directory, an exported .pt2 file or an .onnx file"
        )
    if info.task not in ("classification", "regression"):
        raise ValueError(f"serving {info.task!r} models is not yet supported")
    return Backend(predict, info, kind, str(p))

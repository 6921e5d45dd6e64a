"""Model loading for :mod:`kiln.deploy.serve`: run directories, ``.pt2`` and ``.onnx`` files."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def load_backend(
    target: str | Path | Sequence[str | Path],
    *,
    tta: str | None = None,
    compile: bool = False,
) -> Backend:
    """Load what ``target`` names: run directories (eager), a ``.pt2`` or an ``.onnx`` file.

    Args:
        target: one run directory, several (served as one mean-probability ensemble), or one
            exported file.
        tta: test-time augmentation transforms for eager models (``flip,shift``; see
            :mod:`kiln.algorithms.tta`): each request is answered with the mean over the views.
        compile: ``torch.compile`` the eager model (the warm-up pays the compile time).

    Raises:
        FileNotFoundError: the target or its data description is missing.
        ValueError: the target is not a run directory, ``.pt2`` or ``.onnx`` file, options that
            need an eager model on an exported file, or a task that cannot be served yet.
    """
    targets = [Path(target)] if isinstance(target, (str, Path)) else [Path(t) for t in target]
    if not targets:
        raise ValueError("give a run directory or an exported .pt2/.onnx file to serve")
    p = targets[0]
    kind = "eager"
    if all(t.is_dir() for t in targets):
        from kiln.train.weights import load_model

        info = _read_info(p)
        if info.task not in ("classification", "regression"):
            raise ValueError(f"serving {info.task!r} models is not yet supported")
        model: torch.nn.Module
        if len(targets) > 1:
            from kiln.algorithms.ensemble import load_ensemble

            model = load_ensemble(targets)
            kind = f"ensemble of {len(targets)}"
        else:
            model = load_model(p)
        if tta:
            from kiln.algorithms.tta import TTA, check_transforms, parse_transforms

            transforms = parse_transforms(tta)
            check_transforms(transforms, info.input_shape)
            model = TTA(model, transforms, task=info.task)
            kind += f" + tta({','.join(transforms)})"
        model.eval()
        predict: Callable[[torch.Tensor], torch.Tensor] = model
        if compile:
            predict = torch.compile(model)
            kind += " compiled"
        return Backend(predict, info, kind, ", ".join(map(str, targets)))
    if len(targets) > 1:
        raise ValueError(
            "an ensemble is served from run directories; to serve an exported ensemble, export it "
            "first with `kiln export RUN_A RUN_B --format exported` and serve the .pt2"
        )
    if p.is_file() and p.suffix in (".pt2", ".onnx"):
        from kiln.deploy.export import load_exported

        if tta or compile:
            raise ValueError(
                "--tta and --compile apply to eager models; serve the run directory instead of "
                f"{p.name}, or export the model with its TTA"
            )
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

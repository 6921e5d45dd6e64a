"""Model loading for ``kiln serve``: run folders, ``.pt2``, ``.onnx`` and TorchScript.

A TorchScript file (``.ts``, what ``kiln export --format torchscript`` writes, or ``.pt``) is
a zip archive of the model's TorchScript code and its tensors; ``torch.jit.load`` reads it with
its own restricted unpickler (only torch's own classes, no arbitrary Python globals), but the
archive *is* code: it runs the TorchScript it holds, so serve only files you trust. A ``.pt``
that is a plain ``torch.save`` pickle (no ``code/`` folder) is refused, unread.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.data.base import DataInfo
from kiln.errors import CorruptFileError, UnsafeFileError
from kiln.run import DATA_INFO, read_data_info

__all__ = ["TORCHSCRIPT_SUFFIXES", "Backend", "load_backend"]

TORCHSCRIPT_SUFFIXES = (".ts", ".pt")
"""File endings served as TorchScript archives."""


@dataclass
class Backend:
    """A model to serve: a batch predict function and what its data looks like."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    info: DataInfo
    kind: str
    source: str


def _read_info(run_dir: Path) -> DataInfo:
    """The run's input contract (``data_info.json``)."""
    return read_data_info(run_dir, hint="serve needs the run's data description")


def _exported_info(path: Path) -> DataInfo:
    """The data description of an exported file, via its manifest's source run."""
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        sources = json.loads(manifest.read_text()).get("sources") or []
        for src in sources:
            if (Path(src) / DATA_INFO).is_file():
                return _read_info(Path(src))
    for parent in path.parents:
        if (parent / DATA_INFO).is_file():
            return _read_info(parent)
    raise FileNotFoundError(
        f"cannot find the data description of {path}: no manifest.json naming its run and no "
        "data_info.json in a parent folder; export it with `kiln export RUN`"
    )


def _check_torchscript(path: Path) -> None:
    """Refuse a file that is not a TorchScript archive before torch reads it.

    Raises:
        CorruptFileError: not a zip archive.
        UnsafeFileError: a zip without TorchScript code (a ``torch.save`` pickle).
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptFileError(
            f"{path} is not a TorchScript archive ({exc}); export one with "
            "`kiln export RUN --format torchscript`"
        ) from None
    if not any("/code/" in n for n in names):
        raise UnsafeFileError(
            f"{path} holds no TorchScript code: it looks like a torch.save pickle, which serve "
            "does not load; export the run with `kiln export RUN --format torchscript`"
        )


def load_backend(
    target: str | Path | Sequence[str | Path],
    *,
    tta: str | None = None,
    compile: bool = False,
    trust_code: bool = False,
) -> Backend:
    """Load what ``target`` names: run directories (eager), a ``.pt2``, ``.onnx`` or TorchScript.

    Args:
        target: one run directory, several (served as one mean-probability ensemble), or one
            exported file (``.pt2``, ``.onnx``, or TorchScript ``.ts``/``.pt``).
        tta: test-time augmentation transforms for eager models (``flip,shift``; see
            :mod:`kiln.algorithms.tta`): each request is answered with the mean over the views.
        compile: ``torch.compile`` the eager model (the warm-up pays the compile time).
        trust_code: allow a run's ``model.target`` import path, and a ``.pt2`` whose loading
            unpickles entries (see :mod:`kiln.trust`); off, such files are refused unread.

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
        from kiln.train.checkpoint.weights import load_model

        info = _read_info(p)
        if info.task not in ("classification", "regression"):
            raise ValueError(f"serving {info.task!r} models is not yet supported")
        model: torch.nn.Module
        if len(targets) > 1:
            from kiln.algorithms.ensemble import load_ensemble

            model = load_ensemble(targets, trust_code=trust_code)
            kind = f"ensemble of {len(targets)}"
        else:
            model = load_model(p, trust_code=trust_code)
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
    if p.is_file() and p.suffix in (".pt2", ".onnx", *TORCHSCRIPT_SUFFIXES):
        from kiln.deploy.export import load_exported

        if tta or compile:
            raise ValueError(
                "--tta and --compile apply to eager models; serve the run directory instead of "
                f"{p.name}, or export the model with its TTA"
            )
        info = _exported_info(p)
        if p.suffix in TORCHSCRIPT_SUFFIXES:
            _check_torchscript(p)
            kind = "torchscript"
        else:
            kind = "onnx" if p.suffix == ".onnx" else "exported"
        predict = load_exported(p, kind, trust_code=trust_code)
    elif not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist; pass a run directory or a .pt2/.onnx/.ts file"
        )
    else:
        raise ValueError(
            f"cannot serve {p}: pass a run directory, an exported .pt2 file, an .onnx file or a "
            "TorchScript .ts file"
        )
    if info.task not in ("classification", "regression"):
        raise ValueError(f"serving {info.task!r} models is not yet supported")
    return Backend(predict, info, kind, str(p))

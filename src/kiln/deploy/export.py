"""Export a model to TorchScript, ``torch.export`` (``.pt2``) or ONNX, with a parity check.

Every export is read back from disk and compared with the eager model on real inputs at two
batch sizes (1 and 64 by default, so the dynamic batch dimension is exercised). The comparison
(largest absolute difference, and that difference relative to the largest reference output) is
written to ``manifest.json`` next to the model, with the input and output specification, the
torch and kiln versions, the source run(s) and the options. A difference beyond the tolerance
(``1e-5 + 1e-5 * max|output|`` for every format; the manifest records why it holds for the
format, from :data:`TOLERANCE_WHY`) raises :class:`ParityError` naming the batch size and the
numbers. A model ``torch.export`` cannot capture (``if x.sum() > 0:`` in ``forward``) raises a
:class:`kiln.errors.ModelError` naming that line (:mod:`kiln.deploy.export_errors`).

Formats:

* ``torchscript``: ``torch.jit.script``; when scripting fails, ``torch.jit.trace`` with a
  warning that quotes the scripting error (tracing freezes data-dependent control flow).
  TorchScript is in maintenance in torch 2.13; prefer ``exported`` or ``onnx``.
* ``exported``: ``torch.export.export`` with a dynamic batch dimension, saved with
  ``torch.export.save``; ``torch.export.load(path).module()`` reads it without kiln.
* ``onnx``: the dynamo-based exporter, dynamic batch axis, one self-contained file, checked with
  ``onnx.checker`` and run with ONNX Runtime for the parity check.

Example:
    >>> result = export_runs(["runs/digits"], format="exported")   # doctest: +SKIP
    >>> result.path.name, result.parity[1].max_abs < 1e-5           # doctest: +SKIP
    ('model.pt2', True)
"""

from __future__ import annotations

import contextlib
import json
import platform
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.deploy.export_errors import explain_export_failure, quiet_export
from kiln.errors import ModelError, UsageError

__all__ = [
    "FILES",
    "FORMATS",
    "ExportResult",
    "Parity",
    "ParityError",
    "check_format",
    "export_model",
    "export_runs",
    "load_exported",
]

FORMATS = ("torchscript", "exported", "onnx")
FILES = {"torchscript": "model.ts", "exported": "model.pt2", "onnx": "model.onnx"}
MANIFEST = "manifest.json"
ATOL = 1e-5  # fp32: absolute tolerance
RTOL = 1e-5  # ... plus this fraction of the largest reference output
#: Why :data:`ATOL`/:data:`RTOL` hold for each format, recorded in the manifest. The numbers are
#: the largest differences measured on the shipped digits MLP and ResNet (batches 1, 64, 512).
TOLERANCE_WHY = {
    "torchscript": "the same ATen kernels as the eager model: measured 0 difference, 3.4e-6 "
    "(3.8e-7 of max|output|) with --fuse, whose folded BatchNorm rounds differently",
    "exported": "the same ATen kernels as the eager model: measured 0 difference, 3.4e-6 "
    "(3.8e-7 of max|output|) with --fuse, whose folded BatchNorm rounds differently",
    "onnx": "ONNX Runtime's own kernels sum in another order: measured up to 9.5e-6 "
    "(5e-7 of max|output|)",
}

Predict = Callable[[torch.Tensor], torch.Tensor]


class ParityError(ModelError):
    """The exported model's outputs differ from the eager model's beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    """The exported model against the eager one at one batch size.

    Attributes:
        batch: the batch size compared.
        max_abs: the largest absolute difference of any output element.
        max_rel: ``max_abs`` divided by the largest absolute reference output.
        ok: whether ``max_abs <= atol + rtol * max|reference|``.
    """

    batch: int
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class ExportResult:
    """What an export wrote and how it compared.

    Attributes:
        format: ``torchscript``, ``exported`` or ``onnx``.
        path: the model file.
        manifest: the contents of ``manifest.json`` (written next to ``path``).
        parity: one :class:`Parity` per batch size checked.
        notes: how the export went (``method`` for TorchScript: ``script`` or ``trace``).
    """

    format: str
    path: Path
    manifest: dict[str, Any]
    parity: list[Parity] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """The model file's size on disk."""
        return self.path.stat().st_size


def check_format(format: str) -> str:
    """Return ``format`` if it is one of :data:`FORMATS`.

    Raises:
        ValueError: naming the allowed formats.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    return format


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Ignore torch 2.13's deprecation warnings of the TorchScript API, matched by exact text.

    TorchScript still works in torch 2.13 but every ``script``/``trace``/``load`` call warns that
    it is deprecated; the ``torchscript`` format uses it knowingly (the docs say it is in
    maintenance), so only these texts are hidden and any other warning still shows.
    """
    with warnings.catch_warnings():
        for api in ("script", "trace", "trace_method"):
            warnings.filterwarnings(
                "ignore",
                message=rf"`torch\.jit\.{api}` is deprecated\. Please switch to `torch\.compile` "
                r"or `torch\.export`\.",
                category=DeprecationWarning,
            )
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.jit\.load` is deprecated\. Please switch to `torch\.export`\.",
            category=DeprecationWarning,
        )
        yield


def _example(inputs: torch.Tensor) -> torch.Tensor:
    """A batch of 2 from ``inputs``: a batch of 1 would be specialised by ``torch.export``."""
    x = inputs[:2]
    return x if len(x) >= 2 else x.repeat(2, *[1] * (x.dim() - 1))


def _batch(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` rows of ``inputs``, repeated when there are fewer."""
    reps = -(-size // len(inputs))
    return inputs.repeat(reps, *[1] * (inputs.dim() - 1))[:size].contiguous()


def _spec(t: torch.Tensor, name: str) -> dict[str, Any]:
    """The shape (batch symbolic) and dtype of one tensor."""
    return {"name": name, "shape": ["batch", *t.shape[1:]], "dtype": str(t.dtype).split(".")[-1]}


# ----------------------------------------------------------------------------- formats


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Script (or trace, with a warning) and save; returns notes on the method used."""
    with _quiet_jit():
        try:
            program: Any = torch.jit.script(model)
            notes: dict[str, Any] = {"method": "script"}
        except Exception as e:  # scripting errors have no single public type
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            warnings.warn(
                f"torch.jit.script failed ({reason}); exported with torch.jit.trace instead, "
                "which records only the operations run for the example input: data-dependent "
                "control flow (if/for on tensor values) is frozen to that path",
                UserWarning,
                stacklevel=3,
            )
            with torch.no_grad():
                program = torch.jit.trace(model, (example,))
            notes = {"method": "trace", "script_error": reason}
        program.save(str(path))
    return notes


def _exported(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """``torch.export`` with a dynamic batch dimension, saved as a ``.pt2`` file."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with quiet_export():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises several error types
        raise explain_export_failure(e, "exported") from e
    torch.export.save(program, str(path))
    return {"dynamic_batch": True}


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """The dynamo ONNX exporter (dynamic batch, one file), checked by ``onnx.checker``."""
    from kiln.deploy.onnx import export_onnx

    try:
        with quiet_export():
            export_onnx(model, example, path)
    except Exception as e:  # the exporter wraps torch.export's errors in its own types
        raise explain_export_failure(e, "onnx") from e
    import onnx

    return {"opset": next((o.version for o in onnx.load(str(path)).opset_import), None)}


def load_exported(path: str | Path, format: str, *, trust_code: bool = False) -> Predict:
    """A ``predict`` function over a saved export (CPU float32 tensor in, tensor out).

    A ``.pt2`` is inspected first (:func:`kiln.trust.check_pt2`): one that would be unpickled
    on loading is refused unless ``trust_code``.

    Args:
        path: the model file.
        format: how it was exported.
        trust_code: load a ``.pt2`` even when loading it would unpickle entries (run code).

    Example:
        >>> predict = load_exported("out/model.pt2", "exported")   # doctest: +SKIP
        >>> predict(torch.randn(3, 64)).shape                       # doctest: +SKIP
        torch.Size([3, 10])
    """
    check_format(format)
    if format == "onnx":
        from kiln.deploy.onnx import onnx_predict, onnx_session

        return onnx_predict(onnx_session(Path(path)))
    if format == "torchscript":
        with _quiet_jit():
            module: Any = torch.jit.load(str(path), map_location="cpu")
    else:
        from kiln.trust import check_pt2

        check_pt2(path, trust_code=trust_code)
        module = torch.export.load(str(path)).module()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = module(x)
        return out

    return predict


# ----------------------------------------------------------------------------- export


def _compare(
    reference: torch.Tensor, got: torch.Tensor, batch: int, atol: float, rtol: float
) -> Parity:
    if got.shape != reference.shape:
        raise ParityError(
            f"at batch {batch} the exported model's output has shape {tuple(got.shape)}, "
            f"the eager model's {tuple(reference.shape)}"
        )
    ref = reference.detach().float()
    diff = (got.detach().float() - ref).abs()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and max_abs <= atol + rtol * scale
    return Parity(batch, max_abs, max_abs / scale if scale > 0 else 0.0, ok)


def export_model(
    model: nn.Module,
    inputs: torch.Tensor,
    out_dir: str | Path,
    *,
    format: str,
    reference: nn.Module | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    atol: float = ATOL,
    rtol: float = RTOL,
    sources: Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> ExportResult:
    """Export ``model``, read it back, check parity and write ``manifest.json``.

    Args:
        model: the float32 CPU model to export; it is put in eval mode.
        inputs: real inputs (batch first), e.g. the test split; rows are repeated when a batch
            size asks for more than there are.
        out_dir: the folder to write the model file and ``manifest.json`` to.
        format: ``torchscript``, ``exported`` or ``onnx``.
        reference: the eager model parity is measured against (default ``model``; the unfused
            model when ``model`` is a fused copy).
        batch_sizes: the batch sizes to compare at (at least two, to cover the dynamic batch).
        atol: absolute tolerance.
        rtol: tolerance relative to the largest absolute reference output.
        sources: the run directories the model came from (for the manifest).
        options: export options recorded in the manifest.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: an unknown format.
        kiln.errors.ModelError: the model cannot be captured (the message names the line of
            its code that stops ``torch.export`` and the format that works instead).
        kiln.errors.UsageError: ``out_dir`` is an existing file.
        ParityError: an output differs beyond the tolerance (the manifest is written first,
            with ``"parity_ok": false``).
    """
    check_format(format)
    if inputs.dim() == 0 or len(inputs) == 0:
        raise ValueError("export needs at least one input row (batch first) for the parity check")
    model = model.eval()
    reference = (reference if reference is not None else model).eval()
    inputs = inputs.detach().to("cpu", torch.float32)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"--out {out} is an existing file; give a folder (the export writes "
            f"{FILES[format]} and {MANIFEST} into it)"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILES[format]
    example = _example(inputs)
    writer = {"torchscript": _torchscript, "exported": _exported, "onnx": _onnx}[format]
    notes = writer(model, example, path)
    predict = load_exported(path, format)

    parity: list[Parity] = []
    output_spec: dict[str, Any] = {}
    for size in batch_sizes:
        x = _batch(inputs, size)
        with torch.no_grad():
            ref = reference(x)
        got = predict(x)
        if not output_spec:
            output_spec = _spec(ref, "output")
        parity.append(_compare(ref, got, size, atol, rtol))

    import kiln

    ok = all(p.ok for p in parity)
    manifest: dict[str, Any] = {
        "format": format,
        "file": path.name,
        "bytes": path.stat().st_size,
        "input": _spec(inputs, "x"),
        "output": output_spec,
        "parity": [asdict(p) for p in parity],
        "parity_ok": ok,
        "tolerance": {
            "atol": atol,
            "rtol": rtol,
            "rule": "max_abs <= atol + rtol * max|eager|",
            "why": TOLERANCE_WHY[format],
        },
        "torch": torch.__version__,
        "kiln": kiln.__version__,
        "python": platform.python_version(),
        "sources": list(sources),
        "options": dict(options or {}),
        "notes": notes,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if not ok:
        bad = next(p for p in parity if not p.ok)
        raise ParityError(
            f"the {format} export differs from the eager model at batch {bad.batch}: max abs "
            f"{bad.max_abs:.3g}, max rel {bad.max_rel:.3g} (tolerance {atol:g} abs + {rtol:g} x "
            f"max|output|); files kept in {out} for inspection"
        )
    return ExportResult(format, path, manifest, parity, notes)


def _test_inputs(run_dir: Path, rows: int) -> torch.Tensor:
    """Up to ``rows`` inputs of the run's test split (its val split if it has no test split)."""
    from kiln.run import read_config
    from kiln.train.build import build_data_for, loader_for

    cfg = read_config(run_dir)
    data = build_data_for(cfg)
    dataset = data.test if data.test is not None else data.val
    if dataset is None:
        raise ValueError(f"{run_dir} has no test or val split to check parity on")
    xs: list[torch.Tensor] = []
    for batch in loader_for(cfg, dataset, train=False, device=torch.device("cpu")):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                "kiln export handles models with one float tensor input; "
                f"this run's inputs are {type(x).__name__}"
                + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else "")
                + " (not yet supported)"
            )
        xs.append(x)
        if sum(len(t) for t in xs) >= rows:
            break
    if not xs:
        raise ValueError(f"the evaluation split of {run_dir} is empty; nothing to check parity on")
    return torch.cat(xs)[:rows]


def export_runs(
    runs: Sequence[str | Path],
    *,
    format: str,
    fuse: bool = False,
    out: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    trust_code: bool = False,
) -> ExportResult:
    """Export one run's model, or several runs as one ensemble, with a parity check.

    The weights are each run's ``model.safetensors`` (the EMA weights when the run used EMA).

    Args:
        runs: run directories; several are combined with
            :func:`kiln.algorithms.ensemble.load_ensemble` (mean probability).
        format: ``torchscript``, ``exported`` or ``onnx``.
        fuse: fold BatchNorm/ReLU into convolutions and merge linear chains first
            (:func:`kiln.compress.fuse.fuse`); parity is still measured against the unfused model.
        out: output folder (default ``RUN/export/FORMAT``, ``RUN/export/ensemble-FORMAT`` for
            several runs, under the first run).
        batch_sizes: the batch sizes of the parity check.
        trust_code: allow the runs' ``model.target`` import paths (see :mod:`kiln.trust`).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: unknown format, incompatible runs, an unsupported model or input.
        ParityError: the export differs from the eager model.
        FileNotFoundError: a run directory is incomplete.
    """
    from kiln.algorithms.ensemble import load_ensemble
    from kiln.run import read_data_info, run_dir_of
    from kiln.train.checkpoint.weights import load_model

    check_format(format)
    if not runs:
        raise ValueError("kiln export needs at least one run directory")
    dirs = [run_dir_of(r) for r in runs]
    if read_data_info(dirs[0]).task == "multitask":
        raise ValueError(
            "exporting multi-task models (a dict of outputs) is not yet supported; load the "
            "run in Python with kiln.load_model(RUN)"
        )
    eager: nn.Module = (
        load_ensemble(dirs, trust_code=trust_code)
        if len(dirs) > 1
        else load_model(dirs[0], trust_code=trust_code)
    )
    if any(p.dtype != torch.float32 for p in eager.parameters()):
        raise ValueError(
            "kiln export handles float32 weights only; other dtypes are not yet supported"
        )
    options: dict[str, Any] = {
        "fuse": fuse,
        "ensemble": len(dirs) > 1,
        "batch_sizes": list(batch_sizes),
    }
    model = eager
    if fuse:
        from kiln.compress.fuse import fuse as fuse_model

        model, report = fuse_model(eager)
        options["fused"] = str(report)
    inputs = _test_inputs(dirs[0], max(batch_sizes))
    folder = (
        Path(out)
        if out is not None
        else (dirs[0] / "export" / (format if len(dirs) == 1 else f"ensemble-{format}"))
    )
    return export_model(
        model,
        inputs,
        folder,
        format=format,
        reference=eager,
        batch_sizes=batch_sizes,
        sources=[str(d) for d in dirs],
        options=options,
    )

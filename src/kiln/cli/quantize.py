"""``kiln quantize RUN --method dynamic|static|qat|pt2e|onnx-int8``: int8 model + a measured table.

Reads the run directory (fp32 weights from ``model.safetensors``, data from ``config.yaml``),
quantizes with :func:`kiln.compress.quantize.core.quantize`, saves the result under
``RUN/quantized/<method>/`` (or ``--out``), and measures the fp32 eager model and the quantized
one in this same process: size on disk, latency at batch 1 and 64 (one thread, median), and
accuracy/loss on the test split. The table is printed and written to ``report.json`` next to
the model. The saved file of every method is reloaded and checked to give the same outputs
(``reload_max_abs_diff`` in ``report.json``).

Torch is imported inside the function, so ``kiln --help`` stays fast.

Example:
    >>> run_quantize("runs/digits", method="static", calib_batches=16, qat_epochs=2,
    ...              out=None)                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import Debug, TrustCode

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kiln.config import Config
    from kiln.data.base import DataBundle

__all__ = ["command", "quiet_torch_ao_warnings", "register", "run_quantize"]


def command(
    run: Annotated[str, typer.Argument(help="run directory (its model.safetensors)")],
    method: Annotated[
        str, typer.Option(help="dynamic, static, qat, pt2e or onnx-int8")
    ] = "dynamic",
    calib_batches: Annotated[int, typer.Option(help="training batches for calibration")] = 32,
    qat_epochs: Annotated[int, typer.Option(help="fine-tuning epochs for qat")] = 2,
    out: Annotated[
        str | None, typer.Option(help="output folder (default: RUN/quantized/METHOD)")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Quantize a trained run to int8 and print size, latency and accuracy against fp32."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_quantize(
            run,
            method=method,
            calib_batches=calib_batches,
            qat_epochs=qat_epochs,
            out=out,
            trust_code=trust_code,
        ),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln quantize`` to ``app``."""
    app.command("quantize")(command)


def quiet_torch_ao_warnings() -> None:
    """Hide the torch 2.13 deprecation warnings of the ``torch.ao`` quantization flows.

    The flows still work and ``kiln quantize`` relies on them (see
    ``docs/techniques/quantization.md``); each warning is matched by its exact text so any
    other warning still shows. The test suite filters the same texts in ``pyproject.toml``.
    """
    import warnings

    # prepare_fx/convert_fx/quantize_dynamic: "torch.ao.quantization is deprecated and will be
    # removed in 2.10 ... migrate to torchao" (still present and working in 2.13).
    warnings.filterwarnings(
        "ignore",
        message=r"torch\.ao\.quantization is deprecated and will be removed",
        category=DeprecationWarning,
    )
    # Emitted from C++ whenever an int8 tensor is created (convert, quantized kernels).
    warnings.filterwarnings(
        "ignore",
        message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized "
        r"tensor creation functions",
        category=UserWarning,
    )
    # The x86 default qconfig's observers use reduce_range=True (needed on CPUs without VNNI).
    warnings.filterwarnings(
        "ignore",
        message=r"Please use quant_min and quant_max to specify the range for observers",
        category=UserWarning,
    )


def _example(loader: Any) -> torch.Tensor:
    """The first evaluation batch's inputs (up to 64 rows): traces graphs and times latency."""
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return x[:64]
    raise ValueError("the evaluation split is empty; nothing to measure on")


def _metadata(weights: Path) -> dict[str, str]:
    """The run's Kiln metadata (config, data info), saved with the quantized model too."""
    from kiln.safeio.tensorfile import read_header

    meta = read_header(weights)[1]  # a damaged header is one line naming the file
    return {k: v for k, v in meta.items() if k in ("kiln_config", "kiln_data_info")}


@dataclass
class _Job:
    """A trained run opened for quantization: config, data, fp32 model, loaders."""

    dir: Path
    cfg: Config
    data: DataBundle
    fp32: nn.Module
    weights: Path
    calib_loader: Iterable[Any]
    eval_loader: Iterable[Any]
    example: torch.Tensor
    split: str
    examples: int


def _open(run: str, trust_code: bool = False) -> _Job:
    import torch

    from kiln.run import WEIGHTS, read_config, run_dir_of
    from kiln.train.build import build_data_for, loader_for
    from kiln.train.checkpoint.weights import load_model

    run_dir = run_dir_of(run)
    cfg = read_config(run_dir)
    data = build_data_for(cfg)
    task = data.info.task
    if task not in ("classification", "regression"):
        raise ValueError(
            f"kiln quantize measures classification and regression runs; this run's task is "
            f"{task!r}. Quantize it from Python with kiln.compress.quantize.core.quantize"
        )
    split, dataset = ("test", data.test) if data.test is not None else ("val", data.val)
    if dataset is None:
        raise ValueError("this run has no test or val split to measure accuracy on")
    cpu = torch.device("cpu")
    eval_loader = loader_for(cfg, dataset, train=False, device=cpu)
    return _Job(
        dir=run_dir,
        cfg=cfg,
        data=data,
        fp32=load_model(run_dir, trust_code=trust_code),
        weights=run_dir / WEIGHTS,
        calib_loader=loader_for(cfg, data.train, train=True, device=cpu),
        eval_loader=eval_loader,
        example=_example(eval_loader),
        split=split,
        examples=len(dataset),  # type: ignore[arg-type]
    )


def run_quantize(
    run: str,
    *,
    method: str,
    calib_batches: int = 32,
    qat_epochs: int = 2,
    out: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Quantize a trained run, save it, measure it against fp32; returns the report.

    Args:
        run: a run directory (or its ``model.safetensors``).
        method: ``dynamic``, ``static``, ``qat``, ``pt2e`` or ``onnx-int8``.
        calib_batches: training batches that calibrate ``static``/``pt2e``/``onnx-int8``.
        qat_epochs: fine-tuning epochs of ``qat``.
        out: output folder (default ``RUN/quantized/<method>``).
        trust_code: allow the run's ``model.target`` import path (see :mod:`kiln.trust`).

    Raises:
        ValueError: unknown method, a run without a test/val split, an unsupported model.
    """
    from kiln.compress.quantize.core import check_method

    check_method(method)
    if qat_epochs < 1:
        raise ValueError(f"--qat-epochs must be >= 1, got {qat_epochs}")
    if calib_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {calib_batches}")
    quiet_torch_ao_warnings()
    import torch

    job = _open(run, trust_code)
    out_dir = Path(out) if out else job.dir / "quantized" / method
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier timings; both rows run under the same setting
    try:
        report = _quantize_and_measure(job, method, out_dir, calib_batches, qat_epochs)
    finally:
        torch.set_num_threads(threads)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    _print(report, out_dir)
    return report


def _quantize_and_measure(
    job: _Job, method: str, out_dir: Path, calib_batches: int, qat_epochs: int
) -> dict[str, Any]:
    import torch

    from kiln.compress.quantize.core import quantize, reload_max_abs_diff
    from kiln.compress.report import measure, table

    finetune, changes = None, list[str]()
    if method == "qat":
        from kiln.compress.quantize.ao import qat_config, trainer_finetune

        qcfg, changes = qat_config(job.cfg, epochs=qat_epochs)
        finetune = trainer_finetune(qcfg, job.data, keep=out_dir, verbose=True)
    result = quantize(
        job.fp32,
        method,
        calib_loader=job.calib_loader,
        example=job.example,
        calib_batches=calib_batches,
        finetune=finetune,
        metadata=_metadata(job.weights),
    )
    saved = result.save(out_dir)
    files = result.files or [saved]
    task, x = job.data.info.task, job.example
    rows = [
        measure("fp32", job.fp32, job.weights, job.eval_loader, x, task=task),
        measure(method, result.predict, files, job.eval_loader, x, task=task),
    ]
    # Every method's file is read back and compared with the in-memory model (the torch.ao
    # methods' metadata is the run's, which load_model accepted above, with or without trust).
    reload_diff = reload_max_abs_diff(result, saved, x, trust_code=True)
    notes = dict(result.notes)
    if changes:
        notes["qat_config_changes"] = changes
    return {
        "run": str(job.dir),
        "method": method,
        "split": job.split,
        "examples": job.examples,
        "files": [str(f) for f in files],
        "threads": 1,
        "calib_batches": calib_batches if method != "dynamic" else 0,
        "qat_epochs": qat_epochs if method == "qat" else 0,
        "rows": [r.to_dict() for r in rows],
        "table": table(rows),
        "reload_max_abs_diff": reload_diff,
        "torch": torch.__version__,
        "notes": notes,
    }


def _print(report: dict[str, Any], out_dir: Path) -> None:
    method, notes = report["method"], report["notes"]
    print(
        f"{method} int8 vs fp32 eager: {report['split']} split ({report['examples']} examples), "
        "latency = median ms at 1 thread"
    )
    print(report["table"])
    fused = notes.get("fused", {}).get("counts", {})
    if fused:
        shown = ", ".join(f"{kind} x{n}" for kind, n in fused.items())
        print(f"fused before quantizing: {shown} (names in report.json)")
    if notes.get("quantized"):
        print("int8 layers: " + ", ".join(f"{k} x{v}" for k, v in notes["quantized"].items()))
    for change in notes.get("qat_config_changes", []):
        print(f"qat fine-tune: {change}")
    for message in notes.get("messages", []):
        print(f"note: {message}")
    printed = {"messages", "fused", "quantized", "float_layers", "recipe", "qat_config_changes"}
    details = [
        f"{k}={v}"
        for k, v in notes.items()
        if k not in printed and isinstance(v, (str, int, float, bool))
    ]
    if details:
        print("details: " + ", ".join(details))
    base, row = report["rows"][0]["metrics"], report["rows"][1]["metrics"]
    if "acc" in base and base["acc"] - row.get("acc", 0.0) > 0.01:
        drop = 100 * (base["acc"] - row.get("acc", 0.0))
        hint = "try --method qat" if method != "qat" else "try more --qat-epochs"
        print(f"accuracy dropped {drop:.1f} points; {hint} or more --calib-batches")
    if report["reload_max_abs_diff"] is not None:
        print(f"reloaded from disk: max abs output difference {report['reload_max_abs_diff']:.3g}")
    print(f"saved to {out_dir} (report.json)")

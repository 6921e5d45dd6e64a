"""Int8 quantization through ONNX Runtime, and the ONNX export / session / predict helpers.

:func:`quantize_onnx_int8` exports fp32 ONNX with the dynamo exporter (dynamic batch, one file),
runs ONNX Runtime's pre-processing, then ``quantize_dynamic`` (int8 weights, activations
quantized on the fly) or ``quantize_static`` (QDQ, per-channel weights, activation ranges from
calibration batches). It predicts through an ``onnxruntime.InferenceSession`` on the CPU
execution provider with one intra-op thread. :func:`export_onnx`, :func:`onnx_session` and
:func:`onnx_predict` are also used by ``kiln export``.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compress.quantize.pt2e import (
    _calib_inputs,
    _export_example,
    _no_treespec_warning,
    _quiet,
)
from kiln.compress.report import CompressedModel, Predict

__all__ = ["ONNX_INT8_FILE", "export_onnx", "onnx_predict", "onnx_session", "quantize_onnx_int8"]

ONNX_INT8_FILE = "model_int8.onnx"

_ONNX_HINT = (
    "ONNX int8 quantization needs onnx, onnxscript and onnxruntime: "
    "pip install onnx onnxscript onnxruntime (or pip install 'kiln[compress]')"
)
# The dynamo ONNX exporter logs "torchvision is not installed. Skipping torchvision::nms" etc.
_ONNX_LOGGERS = ("torch.onnx",)


def _require_onnx() -> None:
    """Raise one clear error when a package of the ONNX path is missing."""
    import importlib

    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{_ONNX_HINT} (missing: {', '.join(missing)})")


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export fp32 ONNX with the dynamo exporter: dynamic batch, weights in the one file, checked.

    The input is named ``x`` and its dimension 0 ``batch``; the output is ``output``.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing.

    Example:
        >>> export_onnx(model, torch.randn(8, 64), "out/model.onnx")  # doctest: +SKIP
        PosixPath('out/model.onnx')
    """
    _require_onnx()
    import onnx

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(_ONNX_LOGGERS), _no_treespec_warning():
        torch.onnx.export(
            model.eval(),
            (_export_example(example),),
            str(p),
            dynamo=True,
            dynamic_shapes=({0: "batch"},),
            input_names=["x"],
            output_names=["output"],
            external_data=False,  # one self-contained file, even for large models
            verbose=False,
        )
    onnx.checker.check_model(str(p), full_check=True)
    return p


def onnx_session(model: str | Path | bytes, *, threads: int = 1) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider with ``threads`` intra-op threads.

    Example:
        >>> sess = onnx_session("out/model_int8.onnx")  # doctest: +SKIP
    """
    _require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no per-session info lines on stderr
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def onnx_predict(session: Any) -> Predict:
    """A ``predict`` function (CPU tensor in, CPU tensor out) over an ORT session's first output.

    Example:
        >>> predict = onnx_predict(onnx_session("out/model.onnx"))  # doctest: +SKIP
        >>> predict(torch.randn(3, 64)).shape                       # doctest: +SKIP
        torch.Size([3, 10])
    """
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return predict


def _calibration_reader(loader: Iterable[Any], batches: int, input_name: str) -> Any:
    """An ORT ``CalibrationDataReader`` over the first ``batches`` batches of ``loader``."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = _calib_inputs(loader, batches)
            self.count = 0

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.inputs, None)
            if x is None:
                return None
            self.count += 1
            return {input_name: x.contiguous().numpy()}

    return Reader()


def _op_counts(model_bytes: bytes) -> dict[str, int]:
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    return dict(Counter(node.op_type for node in graph.node))


def quantize_onnx_int8(
    model: nn.Module,
    calib_loader: Iterable[Any],
    example: torch.Tensor,
    *,
    static: bool = False,
    calib_batches: int = 32,
) -> CompressedModel:
    """Int8 ONNX via ONNX Runtime: dynamic (weights only calibrated) or static QDQ.

    Steps: :func:`export_onnx` (fp32, dynamic batch, one file, ``onnx.checker``), ORT's
    ``quant_pre_process`` (shape inference and graph optimisation, the step ORT asks for before
    quantizing), then

    * ``static=False``: ``quantize_dynamic`` with int8 weights; activation ranges are computed
      per batch at run time, so ``calib_loader`` is not read;
    * ``static=True``: ``quantize_static`` in QDQ format, uint8 activations (min-max ranges over
      ``calib_batches`` batches), int8 weights per output channel.

    Args:
        model: a float model on the CPU; it is put in eval mode.
        calib_loader: batches of ``(x, y)`` (or bare inputs); read only when ``static``.
        example: one input batch; its shape (except the batch size) is fixed by the export.
        static: quantize activations with calibrated ranges (faster for conv nets).
        calib_batches: how many batches to calibrate on (``static`` only).

    Returns:
        ``predict`` runs an ``InferenceSession`` (CPU provider, one intra-op thread);
        ``module`` is None; ``save(folder)`` writes ``model_int8.onnx``;
        ``notes`` has the fp32 and int8 file sizes and the op counts of the int8 graph.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing.
        ValueError: ``static`` and the calibration loader is empty.

    Example:
        >>> q = quantize_onnx_int8(model, train_loader, x, static=True)  # doctest: +SKIP
        >>> q.predict(x).argmax(-1)                                       # doctest: +SKIP
        >>> q.save(Path("out"))                                           # doctest: +SKIP
        PosixPath('out/model_int8.onnx')
    """
    _require_onnx()
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: dict[str, Any] = {"static": static}
    with tempfile.TemporaryDirectory(prefix="kiln-onnx-int8-") as tmp:
        fp32 = export_onnx(model, example, Path(tmp) / "model.onnx")
        pre = Path(tmp) / "model_pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        out = Path(tmp) / ONNX_INT8_FILE
        if static:
            reader = _calibration_reader(calib_loader, calib_batches, "x")
            quantize_static(
                str(pre),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            notes.update(format="QDQ", per_channel=True, calib_batches=reader.count)
        else:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
            notes.update(format="QOperator (dynamic)", per_channel=False)
        model_bytes = out.read_bytes()
        notes["fp32_onnx_bytes"] = fp32.stat().st_size
    notes["int8_onnx_bytes"] = len(model_bytes)
    notes["ops"] = _op_counts(model_bytes)
    predict = onnx_predict(onnx_session(model_bytes))
    files: list[Path] = []

    def save(folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ONNX_INT8_FILE
        path.write_bytes(model_bytes)
        files[:] = [path]
        return path

    return CompressedModel("onnx-int8", predict, save, module=None, files=files, notes=notes)

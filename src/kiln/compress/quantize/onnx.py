"""Int8 quantization through ONNX Runtime.

:func:`quantize_onnx_int8` exports fp32 ONNX with the dynamo exporter (dynamic batch, one file,
:func:`kiln.deploy.onnx.export_onnx`), runs ONNX Runtime's pre-processing, then
``quantize_dynamic`` (int8 weights, activations quantized on the fly) or ``quantize_static``
(QDQ, per-channel weights, activation ranges from calibration batches). It predicts through an
``onnxruntime.InferenceSession`` on the CPU execution provider with one intra-op thread
(:func:`kiln.deploy.onnx.onnx_session`). The fp32 export, session and predict helpers belong to
:mod:`kiln.deploy.onnx`: plain export is deploy's job, and int8 builds on it.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compress.quantize.pt2e import _calib_inputs
from kiln.compress.report import CompressedModel
from kiln.deploy.onnx import export_onnx, onnx_predict, onnx_session, require_onnx

__all__ = ["ONNX_INT8_FILE", "quantize_onnx_int8"]

ONNX_INT8_FILE = "model_int8.onnx"


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
    require_onnx()
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

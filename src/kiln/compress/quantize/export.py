"""Int8 quantization through the two export paths: PT2E (torchao + Inductor) and ONNX Runtime.

Both start from a graph captured once, not from the eager ``nn.Module``, which is where int8 pays
off on a CPU today:

* :func:`quantize_pt2e` captures the model with ``torch.export`` (dynamic batch), inserts
  observers with torchao's ``X86InductorQuantizer``, calibrates, converts to a Q/DQ program and
  compiles it with Inductor **with freezing on**. Freezing is what turns the Q/DQ pattern into
  oneDNN int8 kernels with pre-packed weights; without it the compiled program is no faster than
  fp32. The program saves as a ``.pt2`` file (``torch.export.save``); :func:`load_pt2e` reads it
  back.
* :func:`quantize_onnx_int8` exports fp32 ONNX with the dynamo exporter (dynamic batch, one
  file), runs ONNX Runtime's pre-processing, then ``quantize_dynamic`` (int8 weights, activations
  quantized on the fly) or ``quantize_static`` (QDQ, per-channel weights, activation ranges from
  calibration batches). It predicts through an ``onnxruntime.InferenceSession`` on the CPU
  execution provider with one intra-op thread.

Both return :class:`~kiln.compress.report.CompressedModel`, so ``kiln quantize`` puts them in the
same size / latency / accuracy table as the ``torch.ao`` methods.

Which to pick (``benchmarks/quantize.py`` measures it): ONNX Runtime int8 is the fastest path
measured here when the model is deployed to ORT anyway; dynamic for Linear-heavy models, static
for convolutional ones (ORT's dynamic ``ConvInteger`` is slower than fp32). PT2E is the path
that stays in PyTorch: no new runtime, the same ``torch.compile`` toolchain, and a saved program
that ``torch.export.load`` reads. It pays off for large layers only: each oneDNN int8 call costs
tens of microseconds whatever its size, so a tiny MLP runs slower than in fp32
(``docs/techniques/quantization-export.md`` has the numbers).

The implementations live in :mod:`kiln.compress.quantize.pt2e` and
:mod:`kiln.compress.quantize.onnx`; this module re-exports their public names.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    >>> batches = [(torch.randn(8, 16), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    >>> q = quantize_onnx_int8(net, batches, torch.randn(8, 16))  # doctest: +SKIP
    >>> q.predict(torch.randn(3, 16)).shape                        # doctest: +SKIP
    torch.Size([3, 4])
    >>> q.save(Path("out")).name                                   # doctest: +SKIP
    'model_int8.onnx'
"""

from __future__ import annotations

from kiln.compress.quantize.onnx import (
    ONNX_INT8_FILE,
    export_onnx,
    onnx_predict,
    onnx_session,
    quantize_onnx_int8,
)
from kiln.compress.quantize.pt2e import PT2E_FILE, load_pt2e, quantize_pt2e

__all__ = [
    "ONNX_INT8_FILE",
    "PT2E_FILE",
    "export_onnx",
    "load_pt2e",
    "onnx_predict",
    "onnx_session",
    "quantize_onnx_int8",
    "quantize_pt2e",
]

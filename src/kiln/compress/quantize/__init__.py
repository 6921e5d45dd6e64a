"""Int8 quantization: one entry point (:func:`kiln.compress.quantize.core.quantize`), five methods.

* :mod:`kiln.compress.quantize.core`: dispatch by method name, reload and compare.
* :mod:`kiln.compress.quantize.ao`: eager/FX ``torch.ao`` dynamic, static and QAT.
* :mod:`kiln.compress.quantize.saved`: the safetensors file the ``torch.ao`` methods write.
* :mod:`kiln.compress.quantize.pt2e`: PT2E through Inductor.
* :mod:`kiln.compress.quantize.onnx`: int8 through ONNX Runtime (the fp32 export it starts
  from is :mod:`kiln.deploy.onnx`).

Which export path to pick (``benchmarks/quantize.py`` measures it): ONNX Runtime int8 is the
fastest path measured here when the model is deployed to ORT anyway; dynamic for Linear-heavy
models, static for convolutional ones (ORT's dynamic ``ConvInteger`` is slower than fp32). PT2E
is the path that stays in PyTorch: no new runtime, the same ``torch.compile`` toolchain, and a
saved program that ``torch.export.load`` reads. It pays off for large layers only: each oneDNN
int8 call costs tens of microseconds whatever its size, so a tiny MLP runs slower than in fp32
(``docs/techniques/quantization-export.md`` has the numbers).
"""

from kiln.compress.quantize.core import check_method, load_quantized, quantize, reload_max_abs_diff
from kiln.compress.quantize.saved import save_quantized

__all__ = ["check_method", "load_quantized", "quantize", "reload_max_abs_diff", "save_quantized"]

"""Int8 quantization: one entry point (:func:`kiln.compress.quantize.core.quantize`), five methods.

* :mod:`kiln.compress.quantize.core`: dispatch by method name, save, reload and compare.
* :mod:`kiln.compress.quantize.ao`: eager/FX ``torch.ao`` dynamic, static and QAT.
* :mod:`kiln.compress.quantize.export`, :mod:`kiln.compress.quantize.pt2e`: PT2E through Inductor.
* :mod:`kiln.compress.quantize.onnx`: int8 through ONNX Runtime.
"""

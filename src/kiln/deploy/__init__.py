"""Deployment: export a trained run to TorchScript, ``torch.export`` (``.pt2``) or ONNX.

:mod:`kiln.deploy.export` does the work; ``kiln export RUN --format ...`` is its command line.
"""

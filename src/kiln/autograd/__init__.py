"""Custom autograd: Functions with chosen backwards, a ``torch.library`` op, a C++ operator.

Three ways to give PyTorch a gradient it would not derive on its own, from lightest to heaviest:

* ``torch.autograd.Function`` (:mod:`kiln.autograd.functions`): straight-through estimators
  (:func:`ste_round`, :func:`ste_sign`), gradient reversal (:func:`grad_reverse`,
  :class:`GradientReversal`, :func:`dann_alpha`), a Swish that saves only its input
  (:func:`swish`, :class:`Swish`) and surrogate-gradient spikes (:func:`spike`, :class:`Spike`).
  :func:`saved_tensor_stats` counts what autograd keeps for backward.
* ``torch.library.custom_op`` (:mod:`kiln.autograd.ops`): ``kiln::fused_swish``
  (:func:`fused_swish`, :class:`FusedSwish`), with a fake kernel and an autograd formula, so it
  works under ``torch.compile(fullgraph=True)`` and ``torch.export`` and passes ``opcheck``.
* a C++ operator (:mod:`kiln.autograd.cpp`): ``kiln_ext::swish`` with forward and backward in
  C++, built with ``torch.utils.cpp_extension.load_inline`` on first use and cached
  (:func:`swish_cpp`, :func:`load_swish_extension`, :func:`cpp_build_problem`).

Importing this package registers ``kiln::fused_swish`` with torch's dispatcher (``import kiln``
alone does not); the C++ operator is registered only when it is loaded.

See ``docs/techniques/custom-autograd.md`` for when to use which, and
``examples/custom_function.py`` for writing, testing and registering your own.

Example:
    >>> import torch
    >>> from kiln.autograd import grad_reverse, swish
    >>> x = torch.randn(3, requires_grad=True)
    >>> grad_reverse(swish(x)).sum().backward()
"""

from __future__ import annotations

from kiln.autograd.cpp import (
    cpp_build_problem,
    default_build_directory,
    load_swish_extension,
    swish_cpp,
)
from kiln.autograd.functions import (
    GradientReversal,
    GradReverseFunction,
    RoundSTEFunction,
    SavedTensorStats,
    SignSTEFunction,
    Spike,
    SpikeFunction,
    Swish,
    SwishFunction,
    dann_alpha,
    grad_reverse,
    saved_tensor_stats,
    spike,
    ste_round,
    ste_sign,
    swish,
)
from kiln.autograd.ops import FusedSwish, fused_swish

__all__ = [
    "FusedSwish",
    "GradReverseFunction",
    "GradientReversal",
    "RoundSTEFunction",
    "SavedTensorStats",
    "SignSTEFunction",
    "Spike",
    "SpikeFunction",
    "Swish",
    "SwishFunction",
    "cpp_build_problem",
    "dann_alpha",
    "default_build_directory",
    "fused_swish",
    "grad_reverse",
    "load_swish_extension",
    "saved_tensor_stats",
    "spike",
    "ste_round",
    "ste_sign",
    "swish",
    "swish_cpp",
]

"""Non-finite losses and gradients: the error the trainer raises and the diagnosis it gives.

``train.nonfinite=stop`` (the default) saves the weights from before the bad update and raises
:class:`NonFiniteError`, naming the parameters whose gradients went non-finite and the first
module whose output did, so the user knows where to look.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kiln.algorithms.nonfinite import first_nonfinite_module

__all__ = ["NonFiniteError", "describe_nonfinite"]


class NonFiniteError(RuntimeError):
    """Training met a NaN/Inf loss or gradient and ``train.nonfinite`` said to stop."""


def describe_nonfinite(model: nn.Module, x: Any, bad_grads: list[str]) -> str:
    """A short text naming where the non-finite values are.

    Args:
        model: the unwrapped model (its train/eval mode is used as it is).
        x: the batch of the bad update; one more forward pass runs on it (no grad).
        bad_grads: parameter names whose gradients were non-finite (read before zeroing them).
    """
    parts = []
    try:
        hit = first_nonfinite_module(model, x)
    except Exception as exc:  # diagnosis must never hide the original problem
        hit = None
        parts.append(f"(re-running the batch to find the module failed: {exc})")
    if hit is not None:
        name, cls = hit
        if name == "<input>":
            parts.insert(0, "the input batch itself holds NaN/Inf (check the data)")
        else:
            parts.insert(0, f"first non-finite output in module {name!r} ({cls})")
    if bad_grads:
        shown = ", ".join(bad_grads[:3]) + (", ..." if len(bad_grads) > 3 else "")
        parts.append(f"non-finite gradients in {len(bad_grads)} parameters ({shown})")
    if not parts:
        parts.append("the forward pass is finite on a re-run, so the loss itself overflowed")
    return "; ".join(parts)

"""What ``train.nonfinite=stop`` says about a bad update: where the NaN/Inf is.

:func:`stop_error` reads which gradients are non-finite (before dropping them), saves the state
from before the bad update, re-runs the batch to find the first module whose output went
non-finite, and returns the :class:`~kiln.train.guard.NonFiniteError` to raise. The locators are
:mod:`kiln.train.nonfinite`'s.

Example:
    >>> import torch
    >>> from torch import nn
    >>> describe_nonfinite(nn.Linear(2, 1), torch.full((1, 2), float("nan")), [])
    'the input batch itself holds NaN/Inf (check the data)'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kiln.train.build import Parts
from kiln.train.guard import NonFiniteError, stop_message
from kiln.train.loop_state import LoopState
from kiln.train.nonfinite import INPUT, first_nonfinite_module, nonfinite_grads

__all__ = ["describe_nonfinite", "stop_error"]


def describe_nonfinite(model: nn.Module, x: Any, bad_grads: list[str]) -> str:
    """A short text naming where the non-finite values are.

    Args:
        model: the unwrapped model (its train/eval mode is used as it is).
        x: the batch of the bad update; one more forward pass runs on it (no grad).
        bad_grads: parameter names whose gradients were non-finite (read before zeroing them).
    """
    found = []
    try:
        hit = first_nonfinite_module(model, x)
    except Exception as exc:  # diagnosis must never hide the original problem
        hit = None
        found.append(f"(re-running the batch to find the module failed: {exc})")
    if hit is not None:
        name, cls = hit
        if name == INPUT:
            found.insert(0, "the input batch itself holds NaN/Inf (check the data)")
        else:
            # "" is the model itself (its own forward, not a child): name it by its class.
            found.insert(0, f"first non-finite output in module {name or cls!r} ({cls})")
    if bad_grads:
        shown = ", ".join(bad_grads[:3]) + (", ..." if len(bad_grads) > 3 else "")
        found.append(f"non-finite gradients in {len(bad_grads)} parameters ({shown})")
    if not found:
        found.append("the forward pass is finite on a re-run, so the loss itself overflowed")
    return "; ".join(found)


def stop_error(
    parts: Parts, state: LoopState, x: Any, *, save: Callable[[], Path], advice: str
) -> NonFiniteError:
    """``train.nonfinite=stop``: save the weights from before the bad update; the error to raise.

    Args:
        parts: the fit's parts (the model is re-run on ``x`` to find the first bad module).
        state: where the loop is.
        x: the inputs of the bad update's last batch.
        save: writes a checkpoint of the current (pre-update) state; its path.
        advice: what is left to try (from :func:`kiln.train.guard.verdict`).
    """
    model = parts.engine.model
    assert model is not None
    bad_grads = nonfinite_grads(model)  # before the gradients are dropped
    parts.engine.zero_grad(parts.optimizer)
    path = save()
    where = describe_nonfinite(model, x, bad_grads)
    return NonFiniteError(stop_message(state, where=where, saved=path, advice=advice))

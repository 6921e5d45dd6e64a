"""Find where a NaN or Inf came from: which gradients, which module's output.

Used by the trainer's non-finite policy (``train.nonfinite``) and usable in any loop.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     net[1].weight.fill_(float("inf"))
    >>> first_nonfinite_module(net, torch.ones(1, 2))
    ('1', 'Linear')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["first_nonfinite_module", "nonfinite_grads"]


def nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of parameters whose gradient holds a NaN or Inf (one host sync per parameter)."""
    return [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]


def _has_nonfinite(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.is_floating_point() and not bool(torch.isfinite(out).all())
    if isinstance(out, (tuple, list)):
        return any(_has_nonfinite(o) for o in out)
    if isinstance(out, dict):
        return any(_has_nonfinite(o) for o in out.values())
    return False


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, *inputs: Any) -> tuple[str, str] | None:
    """Run ``model(*inputs)`` and return ``(name, class)`` of the first module, in execution
    order, whose output holds a NaN or Inf; ``("<input>", ...)`` when the input already does;
    None when everything is finite. Hooks are always removed.
    """
    if _has_nonfinite(inputs):
        return ("<input>", type(inputs[0]).__name__)
    found: list[tuple[str, str]] = []

    def hook(name: str) -> Any:
        def fn(module: nn.Module, args: Any, out: Any) -> None:
            if not found and _has_nonfinite(out):
                found.append((name, type(module).__name__))

        return fn

    # Leaf modules first in execution order; containers finish after their children, so the
    # first hit is the innermost module that produced the bad value.
    handles = [
        m.register_forward_hook(hook(n or type(m).__name__)) for n, m in model.named_modules()
    ]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None

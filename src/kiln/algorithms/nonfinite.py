"""Where to find NaN/Inf: this module only forwards to :mod:`kiln.train.nonfinite`.

The non-finite locators have one implementation, :mod:`kiln.train.nonfinite`
(:class:`~kiln.train.nonfinite.NonFiniteGuard` and the functions below, which run on it). The
names stay importable from here until ``kiln.train.guard`` imports them from there; the import
is inside each function because ``kiln.train.nonfinite`` imports ``kiln.train.guard``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> first_nonfinite_module(nn.Linear(2, 1), torch.ones(1, 2)) is None
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["first_nonfinite_module", "nonfinite_grads"]


def nonfinite_grads(model: nn.Module) -> list[str]:
    """:func:`kiln.train.nonfinite.nonfinite_grads`."""
    from kiln.train import nonfinite

    return nonfinite.nonfinite_grads(model)


def first_nonfinite_module(model: nn.Module, *inputs: Any) -> tuple[str, str] | None:
    """:func:`kiln.train.nonfinite.first_nonfinite_module`."""
    from kiln.train import nonfinite

    return nonfinite.first_nonfinite_module(model, *inputs)

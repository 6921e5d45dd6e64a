"""The user's module inside the wrappers put around it: DDP, DataParallel, ``torch.compile``.

Names must be those of the user's module (no ``module.`` / ``_orig_mod.`` prefixes) wherever
Kiln keeps state by name (EMA, activation checkpointing) or recognises the model's own call
(``kiln doctor``). Wrappers nest in any order (``torch.compile`` of a DDP model, or DDP of a
compiled one), so both helpers peel them one at a time until none is left.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> unwrap_model(nn.DataParallel(net)) is net
    True
    >>> [type(m).__name__ for m in wrapper_chain(nn.DataParallel(net))]
    ['DataParallel', 'Linear']
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model", "wrapper_chain"]


def _inner(model: nn.Module) -> nn.Module | None:
    """The module one wrapper holds, or None when ``model`` is not a wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, nn.Module) else None


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, then each module it wraps, down to the user's module (last).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> wrapper_chain(net) == [net]
        True
    """
    chain = [model]
    inner = _inner(model)
    while inner is not None:
        chain.append(inner)
        inner = _inner(inner)
    return chain


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside any nesting of DDP, DataParallel and ``torch.compile``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(net) is net
        True
    """
    return wrapper_chain(model)[-1]

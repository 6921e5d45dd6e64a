"""``kiln::fused_swish``: a ``torch.library`` custom op that compiles, exports and differentiates.

An ``autograd.Function`` is enough for eager training and ``torch.compile`` can trace into one,
but some things need an *operator*: a name in the dispatcher that ``torch.export`` writes into
the graph as one node (instead of inlining its body), that an exported program or another
runtime can refer to, and that stays one node under ``torch.compile`` (useful when its kernel is
hand-written and must not be decomposed). ``torch.library.custom_op`` makes one from a Python
function, and three registrations make it work everywhere:

* the **kernel** (the decorated function): Swish-beta ``x * sigmoid(beta * x)`` (Ramachandran
  et al., 2017; ``beta=1`` is SiLU);
* a **fake kernel** (``register_fake``): output shape, dtype and strides without computing,
  which ``torch.compile`` and ``torch.export`` trace with;
* an **autograd formula** (``register_autograd``): ``setup_context`` saves only ``x`` and the
  backward recomputes the sigmoid, so, like :func:`kiln.autograd.swish`, the op keeps one
  tensor alive for backward. The backward is written in torch ops, so it is differentiable
  again (``gradgradcheck`` passes) and traceable;
* a **batching rule** (``register_vmap``) so ``torch.func.vmap`` calls the op once on the
  whole batch instead of once per sample.

``torch.func.grad``/``vjp``/``jacrev`` do not work on a ``custom_op`` with
``register_autograd`` in torch 2.13 (they raise "In order to use an autograd.Function with
functorch transforms ... it must override the setup_context staticmethod"; pytorch/pytorch
issues 168393 and 179652). Use the ``autograd.Function`` :func:`kiln.autograd.swish` under
those transforms.

``torch.library.opcheck`` tests all three against each other (schema, fake vs real, autograd
registration, AOT dispatch). The op is registered when this module is imported, as with every
``torch.library`` op: it has to exist before a compiled graph or a loaded exported program
refers to it. ``import kiln`` alone does not import it.

Example:
    >>> import torch
    >>> x = torch.randn(4)
    >>> torch.testing.assert_close(fused_swish(x), torch.nn.functional.silu(x))
    >>> torch.ops.kiln.fused_swish(x, 2.0).shape
    torch.Size([4])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FusedSwish", "fused_swish"]


@torch.library.custom_op("kiln::fused_swish", mutates_args=())
def _fused_swish(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    return x * torch.sigmoid(beta * x)


@_fused_swish.register_fake
def _fused_swish_fake(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    # Elementwise: same shape, dtype, device and strides as the input, as the kernel returns.
    return torch.empty_like(x)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, beta = inputs
    ctx.save_for_backward(x)
    ctx.beta = beta


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(ctx.beta * x)
    # d/dx [x * s(beta x)] = s + beta * x * s * (1 - s)
    return grad * s * (1 + ctx.beta * x * (1 - s)), None


_fused_swish.register_autograd(_backward, setup_context=_setup_context)


@_fused_swish.register_vmap
def _fused_swish_vmap(
    info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, int | None]:
    # Elementwise, so the batched call is the op itself on the batched tensor, batch dim kept
    # where it was; without this rule torch.func.vmap falls back to a slow per-sample loop.
    return _fused_swish(x, beta), in_dims[0]


def fused_swish(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Swish-beta ``x * sigmoid(beta * x)`` as the custom op ``torch.ops.kiln.fused_swish``.

    Args:
        x: A floating-point tensor.
        beta: The fixed slope inside the sigmoid; ``1.0`` is SiLU.

    Returns:
        ``x * sigmoid(beta * x)``.

    Example:
        >>> x = torch.zeros(2, requires_grad=True)
        >>> fused_swish(x, beta=2.0).sum().backward()
        >>> x.grad
        tensor([0.5000, 0.5000])
    """
    return torch.ops.kiln.fused_swish(x, beta)


class FusedSwish(nn.Module):
    """Module form of :func:`fused_swish`; appears as one ``kiln.fused_swish`` node when exported.

    Args:
        beta: The fixed slope inside the sigmoid.

    Example:
        >>> m = nn.Sequential(nn.Linear(3, 3), FusedSwish())
        >>> ep = torch.export.export(m, (torch.randn(2, 3),))
        >>> any(n.target is torch.ops.kiln.fused_swish.default for n in ep.graph.nodes)
        True
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_swish(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"

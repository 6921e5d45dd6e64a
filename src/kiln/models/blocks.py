"""Custom building blocks: a learnable activation, and a module whose state is buffers.

Two small modules that show the two kinds of state an ``nn.Module`` can hold:

* :class:`Swish` has a *parameter*: ``beta`` in ``x * sigmoid(beta * x)`` (Ramachandran et
  al., 2017) gets a gradient and is trained by the optimizer like any weight. ``beta = 1`` is
  SiLU; as ``beta`` grows it approaches ReLU, and ``beta = 0`` gives the linear ``x / 2``.
* :class:`RunningStandardize` has *buffers*: running mean and variance of its input,
  updated from the data in training mode (not by gradients). A buffer is saved in
  ``state_dict()``, moved and cast by ``.to()`` / ``.double()`` like a parameter, but it is
  not in ``parameters()``, so no optimizer sees it and weight decay never touches it. A buffer
  registered with ``persistent=False`` is moved by ``.to()`` but left out of ``state_dict()``:
  use it for values recomputed every step (here, the last batch's mean, for inspection).

Rule of thumb: state that gradients should change is a parameter; state computed from data
or fixed (statistics, masks, lookup tables, position encodings) is a buffer. A plain tensor
attribute is neither: ``.to()`` leaves it behind on the old device and checkpoints miss it.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(RunningStandardize(3), torch.nn.Linear(3, 8), Swish())
    >>> [name for name, _ in net.named_parameters()]
    ['1.weight', '1.bias', '2.beta']
    >>> sorted(net.state_dict())  # doctest: +NORMALIZE_WHITESPACE
    ['0.count', '0.running_mean', '0.running_var', '1.bias', '1.weight', '2.beta']
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RunningStandardize", "Swish"]


class Swish(nn.Module):
    """``x * sigmoid(beta * x)`` with a learnable scalar ``beta``.

    Args:
        beta: the starting value of ``beta``; 1 makes it equal to ``nn.SiLU`` at start.
        learnable: when False, ``beta`` is a (saved) buffer instead of a parameter, i.e. a
            fixed Swish-beta.

    Example:
        >>> import torch
        >>> act = Swish()
        >>> x = torch.linspace(-3, 3, 7)
        >>> torch.allclose(act(x), torch.nn.functional.silu(x))
        True
        >>> act(x).sum().backward()
        >>> act.beta.grad is not None
        True
    """

    beta: torch.Tensor

    def __init__(self, beta: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            raise ValueError(f"Swish beta must be a finite number (1.0 is SiLU), got {beta!r}")
        value = torch.tensor(float(beta))
        if learnable:
            self.beta = nn.Parameter(value)
        else:
            self.register_buffer("beta", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise; any shape."""
        return x * torch.sigmoid(self.beta * x)

    def extra_repr(self) -> str:
        learnable = isinstance(self.beta, nn.Parameter)
        return f"beta={self.beta.item():g}, learnable={learnable}"


class RunningStandardize(nn.Module):
    """Standardise features with a running mean and variance kept as buffers.

    ``y = (x - running_mean) / sqrt(running_var + eps)`` over the last dimension, optionally
    followed by a learnable ``y * weight + bias``. In training mode each call first folds the
    batch's statistics into the running ones; in eval mode they are frozen. Unlike BatchNorm,
    the output always uses the running statistics, so a sample's output does not depend on the
    rest of its batch (what you want for inputs, e.g. tabular features or observations).

    Buffers:
        ``running_mean``, ``running_var`` (``(num_features,)``, float) and ``count`` (int64,
        samples seen) are saved in ``state_dict()``. ``last_mean`` is registered with
        ``persistent=False``: moved by ``.to()``, never saved.

    Args:
        num_features: size of the last dimension of the input.
        momentum: ``None`` (default) for the exact mean and (population) variance of every
            sample seen so far; a float in ``(0, 1]`` for an exponential moving average
            ``stat = (1 - momentum) * stat + momentum * batch_stat``, which tracks data that
            drifts.
        eps: added to the variance before the square root.
        affine: add a learnable per-feature ``weight`` (1) and ``bias`` (0): parameters, next
            to the buffers.

    Example:
        >>> import torch
        >>> norm = RunningStandardize(2)
        >>> data = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
        >>> _ = norm(data[:1]), norm(data[1:])  # two batches; statistics are exact
        >>> norm.running_mean.tolist(), norm.running_var.tolist(), norm.count.item()
        ([1.0, 20.0], [1.0, 100.0], 2)
        >>> list(norm.parameters())  # buffers are not parameters
        []
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    count: torch.Tensor
    last_mean: torch.Tensor

    def __init__(
        self,
        num_features: int,
        momentum: float | None = None,
        eps: float = 1e-5,
        affine: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(
                f"momentum must be None (exact running average) or in (0, 1], got {momentum!r}"
            )
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_mean", torch.zeros(num_features), persistent=False)
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:  # registered as None, as nn.BatchNorm does: the names exist, the state does not
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, self.num_features).to(self.running_mean.dtype)
        n = flat.shape[0]
        if n == 0:
            return
        mean = flat.mean(dim=0)
        var = flat.var(dim=0, unbiased=False)
        self.last_mean.copy_(mean)
        if self.momentum is not None:
            if self.count == 0:  # the first batch replaces the placeholder 0 / 1
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
            else:
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            # Chan et al.'s pairwise update: exact mean and variance of the union of both sets,
            # and stable (no sum of squares that cancels).
            seen = self.count.to(mean.dtype)
            total = seen + n
            delta = mean - self.running_mean
            m2 = self.running_var * seen + var * n + delta.square() * seen * n / total
            self.running_mean.add_(delta * n / total)
            self.running_var.copy_(m2 / total)
        self.count.add_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., num_features)`` -> same shape and dtype, standardised."""
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"RunningStandardize({self.num_features}) got input with last dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)}); features must be the last dimension"
            )
        if self.training:
            self._update(x)
        scale = torch.rsqrt(self.running_var + self.eps)
        y = (x - self.running_mean) * scale
        if self.weight is not None and self.bias is not None:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, eps={self.eps:g}, "
            f"affine={self.weight is not None}"
        )

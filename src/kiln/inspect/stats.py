"""Per-layer statistics of activations and gradients for one batch: the numbers behind
"is this layer dead, exploding or vanishing?".

For each hooked module, :func:`layer_stats` runs one forward (and, given a loss, one backward)
pass and reduces the module's output and the gradient with respect to that output to a
:class:`TensorStats`: mean and standard deviation (over the finite values), min and max, the
fraction of exact zeros, the fraction of *dead units* and the count of NaN/Inf values, plus a
histogram. Statistics are computed inside the hooks, so no activation is kept alive after its
module ran.

A *unit* is one element of one example's output (a feature of a linear layer, one channel at
one position of a convolution's map): it is *dead* when it is zero for every example of the
batch, which is what a ReLU that never fires looks like. A dead fraction near 1 after a ReLU
means the layer passes almost nothing on.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> report = layer_stats(net, x, lambda out: nn.functional.cross_entropy(out, y))
    >>> [r.name for r in report.layers]
    ['0', '1', '2']
    >>> report.layer("1").activation.zero_fraction > 0  # a ReLU zeroes the negative half
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kiln.inspect.hooks import backward_hooks, first_tensor, forward_hooks, select_modules

__all__ = [
    "LayerStats",
    "StatsReport",
    "TensorStats",
    "json_safe",
    "layer_stats",
    "tensor_stats",
]


@dataclass(frozen=True)
class TensorStats:
    """Summary numbers of one tensor (an activation or a gradient).

    Attributes:
        shape: the tensor's shape.
        mean: mean of the finite values (NaN when there are none).
        std: standard deviation (population, ``correction=0``) of the finite values.
        min: smallest finite value.
        max: largest finite value.
        zero_fraction: fraction of elements exactly 0.
        dead_fraction: fraction of units (elements of one example, dimension 0 being the
            batch) that are 0 for every example; None for tensors of fewer than 2 dimensions.
        nonfinite: number of NaN and Inf elements.
        hist_counts: histogram counts of the finite values.
        hist_edges: the histogram's bin edges (one more than ``hist_counts``).

    Example:
        >>> s = tensor_stats(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), bins=2)
        >>> s.mean, s.zero_fraction, s.dead_fraction, s.hist_counts
        (1.0, 0.5, 0.5, (3, 1))
    """

    shape: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    dead_fraction: float | None
    nonfinite: int
    hist_counts: tuple[int, ...]
    hist_edges: tuple[float, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@torch.no_grad()
def tensor_stats(t: torch.Tensor, *, bins: int = 40) -> TensorStats:
    """Reduce a tensor to :class:`TensorStats` (a few host syncs; call it outside hot loops).

    Args:
        t: any tensor; it is read as float32. Dimension 0 is the batch for ``dead_fraction``.
        bins: histogram bins over ``[min, max]`` of the finite values.

    Raises:
        ValueError: ``bins < 1``.

    Example:
        >>> tensor_stats(torch.tensor([1.0, float("nan"), 3.0])).nonfinite
        1
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    x = t.detach().float()
    finite_mask = torch.isfinite(x)
    finite = x[finite_mask]
    nonfinite = int(x.numel() - finite.numel())
    numel = max(x.numel(), 1)
    zero_fraction = float((x == 0).sum()) / numel
    dead: float | None = None
    if x.dim() >= 2 and x.shape[0] > 0:
        dead = float((x == 0).all(dim=0).float().mean())
    if finite.numel() == 0:
        nan = float("nan")
        return TensorStats(
            tuple(x.shape), nan, nan, nan, nan, zero_fraction, dead, nonfinite, (), ()
        )
    std, mean = torch.std_mean(finite, correction=0)
    lo, hi = float(finite.min()), float(finite.max())
    low, high = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # one value: a bin around it
    counts = torch.histc(finite, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return TensorStats(
        shape=tuple(x.shape),
        mean=float(mean),
        std=float(std),
        min=lo,
        max=hi,
        zero_fraction=zero_fraction,
        dead_fraction=dead,
        nonfinite=nonfinite,
        hist_counts=tuple(int(c) for c in counts.tolist()),
        hist_edges=tuple(float(e) for e in edges.tolist()),
    )


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one module for one batch.

    Attributes:
        name: the module's dotted name.
        type: its class name.
        calls: how often it ran in the forward pass (the statistics are of the last call).
        activation: statistics of its output (its first tensor); None when it did not run.
        gradient: statistics of the loss gradient with respect to that output; None without a
            loss, or when the output does not reach the loss.

    Example:
        >>> LayerStats("fc", "Linear", 1, None, None).type
        'Linear'
    """

    name: str
    type: str
    calls: int
    activation: TensorStats | None
    gradient: TensorStats | None


@dataclass(frozen=True)
class StatsReport:
    """:func:`layer_stats` 's result: one :class:`LayerStats` per module, and the loss.

    Attributes:
        layers: in the model's definition order.
        loss: the loss of the batch, when a loss function was given.

    Example:
        >>> from torch import nn
        >>> report = layer_stats(nn.Sequential(nn.Linear(2, 2)), torch.ones(3, 2))
        >>> report.layer("0").activation.shape, report.loss
        ((3, 2), None)
    """

    layers: tuple[LayerStats, ...]
    loss: float | None

    def layer(self, name: str) -> LayerStats:
        """The statistics of the module called ``name``.

        Raises:
            KeyError: no such layer; the message lists the names.
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers: {', '.join(s.name for s in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready; NaN written as None)."""
        return json_safe(asdict(self))


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf floats replaced by None and tuples by lists: strict JSON.

    ``json.dumps`` would write ``NaN``, which most JSON readers reject.

    Example:
        >>> json_safe({"a": (1.0, float("nan"))})
        {'a': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def layer_stats(
    model: nn.Module,
    inputs: torch.Tensor | tuple[Any, ...],
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    names: Iterable[str] | None = None,
    bins: int = 40,
) -> StatsReport:
    """Activation and gradient statistics per module for one batch.

    Runs ``model(*inputs)`` with forward hooks and, when ``loss_fn`` is given,
    ``loss_fn(output).backward()`` with full backward hooks; the model's train/eval mode is used
    as it is. The backward fills the parameters' ``.grad`` like any backward would: zero them
    afterwards if the model goes on training.

    Args:
        model: the model (its in-place modules need :func:`kiln.inspect.hooks.no_inplace`).
        inputs: the batch: a tensor, or a tuple of positional arguments.
        loss_fn: maps the model's output to a scalar loss; None for activations only.
        names: modules to measure (default: every leaf module).
        bins: histogram bins.

    Returns:
        The statistics, one entry per selected module in definition order.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].bias.fill_(-100.0)  # every unit below zero: a dead ReLU
        >>> layer_stats(net, torch.randn(8, 3)).layer("1").activation.dead_fraction
        1.0
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if loss_fn is not None:
        # A float input that asks for a gradient gives modules before the first parameter (a
        # Flatten, a normalising layer) an output gradient too.
        args = tuple(
            a.detach().clone().requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a
            for a in args
        )
    modules = select_modules(model, names)
    acts: dict[str, TensorStats] = {}
    grads: dict[str, TensorStats] = {}
    calls = dict.fromkeys(modules, 0)

    def on_forward(name: str, module: nn.Module, _: tuple[Any, ...], out: Any) -> None:
        calls[name] += 1
        t = first_tensor(out)
        if t is not None:
            acts[name] = tensor_stats(t, bins=bins)

    def on_backward(name: str, module: nn.Module, grad_output: tuple[Any, ...]) -> None:
        if grad_output and grad_output[0] is not None:
            grads[name] = tensor_stats(grad_output[0], bins=bins)

    loss_value: float | None = None
    with forward_hooks(model, on_forward, list(modules)):
        if loss_fn is None:
            with torch.no_grad():
                model(*args)
        else:
            with torch.enable_grad(), backward_hooks(model, on_backward, list(modules)):
                loss = loss_fn(model(*args))
                loss_value = float(loss.detach())
                loss.backward()
    layers = tuple(
        LayerStats(n, type(m).__name__, calls[n], acts.get(n), grads.get(n))
        for n, m in modules.items()
    )
    return StatsReport(layers, loss_value)

"""Custom ``torch.autograd.Function``s whose backward is a deliberate choice, with wrappers.

Four techniques where the gradient autograd would derive is not the one you want:

* **Straight-through estimators** (Bengio et al., 2013): :func:`ste_round` and :func:`ste_sign`
  quantise in the forward pass and pass the gradient through in the backward pass, as if the
  forward had been the identity (``ste_sign`` zeroes it where ``|x| > clip``, the "hardtanh"
  variant of BinaryConnect/BinaryNet). Used for quantisation-aware training and binary nets.
* **Gradient reversal** (Ganin & Lempitsky, 2015): :func:`grad_reverse` is the identity forward
  and multiplies the gradient by ``-alpha`` backward, so a feature extractor learns to *fool* a
  domain classifier trained on top of it (DANN). :func:`dann_alpha` is the paper's schedule.
* **Memory-saving Swish/SiLU**: :func:`swish` saves only its input and recomputes the sigmoid in
  backward; the composite ``x * torch.sigmoid(x)`` also keeps ``sigmoid(x)`` alive.
  :func:`saved_tensor_stats` measures the difference.
* **Surrogate-gradient spikes** (Zenke & Ganguli, 2018, SuperSpike): :func:`spike` is the
  Heaviside step forward and the fast-sigmoid derivative ``1 / (slope * |x| + 1) ** 2`` backward,
  so spiking networks train with backpropagation.

Every Function uses the torch 2.x style: ``forward(*args)`` does only the computation and a
separate ``setup_context(ctx, inputs, output)`` saves what backward needs, with
``generate_vmap_rule = True``. That split is what lets ``torch.func`` (``grad``, ``vmap``,
``jacrev``) and ``torch.compile`` run the forward under their own transforms; the older
``forward(ctx, *args)`` style works in eager autograd only. What each one saves, and why, is in
its docstring and in ``docs/techniques/custom-autograd.md``.

Example:
    >>> import torch
    >>> x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    >>> ste_round(x).sum().backward()
    >>> x.grad
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "GradReverseFunction",
    "GradientReversal",
    "RoundSTEFunction",
    "SavedTensorStats",
    "SignSTEFunction",
    "Spike",
    "SpikeFunction",
    "Swish",
    "SwishFunction",
    "dann_alpha",
    "grad_reverse",
    "saved_tensor_stats",
    "spike",
    "ste_round",
    "ste_sign",
    "swish",
]


class RoundSTEFunction(torch.autograd.Function):
    """``round`` forward, identity backward (straight-through estimator).

    Saves nothing: the backward is ``grad_output`` itself, so no tensor has to outlive the forward.
    Not ``once_differentiable``: the identity is differentiable, and double backward gives zero.

    Example:
        >>> RoundSTEFunction.apply(torch.tensor([1.4, 2.6]))
        tensor([1., 3.])
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class SignSTEFunction(torch.autograd.Function):
    """``±1`` forward, gradient passed where ``|x| <= clip`` and zeroed elsewhere.

    Saves the input (``ctx.save_for_backward``) only when ``clip`` is set, because the mask
    ``|x| <= clip`` needs it; with ``clip=None`` the backward is the identity and saves nothing.

    Example:
        >>> SignSTEFunction.apply(torch.tensor([-0.3, 0.0]), 1.0)
        tensor([-1.,  1.])
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, clip: float | None) -> torch.Tensor:
        # sign(0) is +1 here, so every output is exactly -1 or +1 (BinaryNet's binarisation).
        return (x >= 0).to(x.dtype) * 2 - 1

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, clip = inputs
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.clip is None:
            return grad, None
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class GradReverseFunction(torch.autograd.Function):
    """Identity forward, ``-alpha * grad_output`` backward.

    Saves no tensor, only the Python float ``alpha`` on ``ctx``. The forward returns
    ``x.view_as(x)``, not ``x`` itself: a Function that returns its input unchanged would give
    the caller the same tensor object, and autograd needs a new output to hang the backward on.

    Example:
        >>> GradReverseFunction.apply(torch.tensor([2.0]), 1.0)
        tensor([2.])
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.alpha = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.alpha, None


class SwishFunction(torch.autograd.Function):
    """``x * sigmoid(x)`` that saves only ``x`` and recomputes ``sigmoid(x)`` in backward.

    Trades one extra ``sigmoid`` in backward for not keeping a second activation-sized tensor
    alive between forward and backward. The backward is written in differentiable torch ops,
    so second derivatives work (``gradgradcheck`` passes) and it is not ``once_differentiable``.

    Example:
        >>> SwishFunction.apply(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7311])
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        # d/dx [x * s(x)] = s + x * s * (1 - s) = s * (1 + x * (1 - s))
        return grad * s * (1 + x * (1 - s))


class SpikeFunction(torch.autograd.Function):
    """Heaviside forward (``1`` where ``x > 0``), fast-sigmoid surrogate backward.

    The surrogate is ``grad_output / (slope * |x| + 1) ** 2``, which needs ``x``: it is saved with
    ``ctx.save_for_backward``. The backward is ``once_differentiable``: a second derivative would
    be the derivative of a made-up surrogate, not of anything the forward computes, so double
    backward is refused rather than silently returning it.

    Example:
        >>> SpikeFunction.apply(torch.tensor([-1.0, 0.5]), 25.0)
        tensor([0., 1.])
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, slope: float) -> torch.Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, slope = inputs
        ctx.save_for_backward(x)
        ctx.slope = slope

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad / (ctx.slope * x.abs() + 1) ** 2, None


def _check_float(name: str, value: float, *, positive: bool, fix: str) -> None:
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}; {fix}")


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, passing the gradient straight through.

    Args:
        x: Any floating-point tensor.

    Returns:
        ``torch.round(x)``; its gradient with respect to ``x`` is ``grad_output`` unchanged.

    Example:
        >>> w = torch.tensor([0.2, 0.7], requires_grad=True)
        >>> q = ste_round(w * 4) / 4  # fake-quantise to a 0.25 grid
        >>> q
        tensor([0.2500, 0.7500], grad_fn=<DivBackward0>)
        >>> q.sum().backward(); w.grad
        tensor([1., 1.])
    """
    return RoundSTEFunction.apply(x)


def ste_sign(x: torch.Tensor, clip: float | None = 1.0) -> torch.Tensor:
    """Binarise to ``±1`` (``+1`` at zero), with a straight-through gradient.

    Args:
        x: Any floating-point tensor.
        clip: The gradient passes where ``|x| <= clip`` and is zero elsewhere (the derivative of
            ``hardtanh`` for ``clip=1``), so weights far outside the range stop moving. ``None``
            passes it everywhere (the plain identity STE).

    Returns:
        A tensor of ``-1.0`` and ``+1.0`` with the dtype of ``x``.

    Raises:
        ValueError: If ``clip`` is not a finite number > 0.

    Example:
        >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
        >>> ste_sign(x)
        tensor([-1., -1.,  1.,  1.], grad_fn=<SignSTEFunctionBackward>)
        >>> ste_sign(x).sum().backward(); x.grad
        tensor([0., 1., 1., 1.])
    """
    if clip is not None:
        _check_float("clip", clip, positive=True, fix="pass None to pass the gradient everywhere")
    return SignSTEFunction.apply(x, clip)


def grad_reverse(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Identity forward; multiply the gradient by ``-alpha`` backward (gradient reversal).

    Put it between a feature extractor and a domain classifier: the classifier learns to tell
    the domains apart while the features learn to make that impossible (DANN).

    Args:
        x: The features.
        alpha: The reversal strength ``lambda`` of the paper, ``>= 0``; often ramped from 0 to 1
            with :func:`dann_alpha`. ``0`` blocks the gradient, like ``detach``.

    Returns:
        A tensor equal to ``x``.

    Raises:
        ValueError: If ``alpha`` is negative or not finite.

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, alpha=0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    _check_float("alpha", alpha, positive=False, fix="the reversal already negates the gradient")
    return GradReverseFunction.apply(x, alpha)


def dann_alpha(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule ``2 / (1 + exp(-gamma * progress)) - 1`` for :func:`grad_reverse`.

    It starts at 0, when the domain classifier's gradient is still noise, and rises to about 1.

    Args:
        progress: Training progress in ``[0, 1]`` (step / total steps).
        gamma: Steepness; the paper uses 10.

    Returns:
        ``alpha`` in ``[0, 1)``.

    Raises:
        ValueError: If ``progress`` is outside ``[0, 1]``.

    Example:
        >>> dann_alpha(0.0), round(dann_alpha(1.0), 4)
        (0.0, 0.9999)
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (step / total steps), got {progress!r}")
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def swish(x: torch.Tensor) -> torch.Tensor:
    """Swish/SiLU ``x * sigmoid(x)`` that keeps only ``x`` for backward.

    ``torch.nn.functional.silu`` saves only its input too; this Function shows how, and is the
    pattern to follow for activations torch has no fused kernel for.

    Args:
        x: Any floating-point tensor.

    Returns:
        ``x * sigmoid(x)``.

    Example:
        >>> x = torch.randn(1000, requires_grad=True)
        >>> torch.testing.assert_close(swish(x), torch.nn.functional.silu(x))
        >>> saved_tensor_stats(swish, x)  # x only
        SavedTensorStats(count=1, unique_bytes=4000)
        >>> saved_tensor_stats(lambda t: t * torch.sigmoid(t), x)  # x and sigmoid(x), twice
        SavedTensorStats(count=3, unique_bytes=8000)
    """
    return SwishFunction.apply(x)


def spike(x: torch.Tensor, slope: float = 25.0) -> torch.Tensor:
    """Heaviside spike ``1[x > 0]`` with the fast-sigmoid surrogate gradient.

    Args:
        x: Membrane potential minus the threshold.
        slope: Sharpness ``k`` of the surrogate ``1 / (k * |x| + 1) ** 2``: larger is closer to
            the true (zero almost everywhere) derivative and harder to train; 25 is snnTorch's
            default.

    Returns:
        ``0.0``/``1.0`` spikes with the dtype of ``x``.

    Raises:
        ValueError: If ``slope`` is not a finite number > 0.

    Example:
        >>> v = torch.tensor([-0.1, 0.0, 0.2], requires_grad=True)
        >>> spike(v, slope=10.0)
        tensor([0., 0., 1.], grad_fn=<SpikeFunctionBackward>)
        >>> spike(v, slope=10.0).sum().backward(); v.grad
        tensor([0.2500, 1.0000, 0.1111])
    """
    _check_float("slope", slope, positive=True, fix="25 is a common choice")
    return SpikeFunction.apply(x, slope)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; set ``alpha`` between steps to follow a schedule.

    Args:
        alpha: The reversal strength, ``>= 0``.

    Example:
        >>> head = nn.Sequential(GradientReversal(0.0), nn.Linear(4, 2))
        >>> head[0].alpha = dann_alpha(progress=0.5)  # e.g. once per step
        >>> head[0]
        GradientReversal(alpha=0.9866)
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4g}"


class Swish(nn.Module):
    """Module form of :func:`swish` (Swish/SiLU that saves only its input).

    Example:
        >>> Swish()(torch.zeros(2))
        tensor([0., 0.])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish(x)


class Spike(nn.Module):
    """Module form of :func:`spike`.

    Args:
        slope: Sharpness of the fast-sigmoid surrogate gradient.

    Example:
        >>> Spike(slope=5.0)(torch.tensor([-1.0, 1.0]))
        tensor([0., 1.])
    """

    def __init__(self, slope: float = 25.0) -> None:
        super().__init__()
        _check_float("slope", slope, positive=True, fix="25 is a common choice")
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spike(x, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope:g}"


@dataclass(frozen=True)
class SavedTensorStats:
    """What autograd saved for backward during one call.

    Attributes:
        count: How many tensors were packed (one per ``save_for_backward`` slot, duplicates
            included).
        unique_bytes: Bytes of the distinct storages among them: the memory the graph keeps alive.

    Example:
        >>> SavedTensorStats(count=1, unique_bytes=4000).unique_bytes
        4000
    """

    count: int
    unique_bytes: int


def saved_tensor_stats(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SavedTensorStats:
    """Run ``fn(*args, **kwargs)`` and count the tensors autograd saves for its backward.

    Uses ``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees every tensor a backward
    node saves, whether from ``ctx.save_for_backward`` or a built-in op.

    Args:
        fn: The forward to measure. At least one argument should require grad, or nothing is
            saved.
        *args: Positional arguments for ``fn``.
        **kwargs: Keyword arguments for ``fn``.

    Returns:
        The count and the distinct bytes of the saved tensors.

    Example:
        >>> x = torch.randn(1000, requires_grad=True)
        >>> saved_tensor_stats(torch.nn.functional.silu, x)
        SavedTensorStats(count=1, unique_bytes=4000)
    """
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}
    return SavedTensorStats(count=len(packed), unique_bytes=sum(storages.values()))

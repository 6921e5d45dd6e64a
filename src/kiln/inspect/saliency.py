"""Saliency maps: which parts of an input a prediction depends on.

Four methods, each a plain function of ``(model, x, target)``:

* :func:`vanilla_gradient`: ``|d score / d x|`` (Simonyan et al., 2014);
* :func:`gradient_x_input`: ``x * d score / d x`` (signed; exact for a linear model);
* :func:`smoothgrad`: the vanilla gradient averaged over ``samples`` noisy copies of ``x``
  (Smilkov et al., 2017), which removes much of the gradient's pixel-level noise;
* :func:`grad_cam`: for convolutional models, the class-weighted feature map of one layer
  (Selvaraju et al., 2017): ``relu(sum_k mean_ij(d score / d A_k) * A_k)``, upsampled to the
  input's size.

``score`` is the model output of the target class for each example (``target=None``: the
predicted class). Gradients are taken with ``torch.autograd.grad`` with respect to the input
(or the layer), so the parameters' ``.grad`` stay untouched. Run the model in eval mode: in
train mode BatchNorm mixes the examples of a batch and dropout is random.

The numbers match Captum's ``Saliency``, ``InputXGradient``, ``NoiseTunnel(Saliency,
nt_type="smoothgrad")`` (same seed) and ``LayerGradCam`` (``tests/inspect`` checks it where
Captum is installed).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 2)
    >>> x = torch.randn(4, 3)
    >>> g = vanilla_gradient(net, x, target=1, absolute=False)
    >>> torch.equal(g, net.weight[1].detach().expand(4, 3))  # a linear score's gradient
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kiln.inspect.hooks import (
    capture_activations,
    first_tensor,
    forward_hooks,
    no_inplace,
    select_modules,
)

__all__ = [
    "METHODS",
    "default_cam_layer",
    "grad_cam",
    "gradient_x_input",
    "resolve_targets",
    "saliency",
    "smoothgrad",
    "vanilla_gradient",
]

METHODS = ("gradient", "grad_x_input", "smoothgrad", "gradcam")
"""The method names :func:`saliency` and ``kiln inspect --method`` accept."""

Target = int | torch.Tensor | None


def resolve_targets(output: torch.Tensor, target: Target) -> torch.Tensor:
    """The class index per example whose score is explained.

    Args:
        output: the model's output, ``(N, C)`` (or ``(N,)`` for a single score).
        target: None for the predicted class (argmax), an int for the same class for every
            example, or a tensor of ``N`` class indices.

    Returns:
        A long tensor ``(N,)`` (zeros for a ``(N,)`` output).

    Raises:
        ValueError: the output is not ``(N,)`` or ``(N, C)``, or a target is out of range.

    Example:
        >>> resolve_targets(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), None).tolist()
        [1, 0]
    """
    if output.dim() == 1:
        return torch.zeros(len(output), dtype=torch.long, device=output.device)
    if output.dim() != 2:
        raise ValueError(
            "saliency explains one score per example: the model must return (N, classes) or "
            f"(N,), got an output of shape {list(output.shape)}"
        )
    n, classes = output.shape
    if target is None:
        return output.detach().argmax(dim=1)
    t = torch.as_tensor(target, device=output.device).long()
    t = t.expand(n) if t.dim() == 0 else t
    if t.shape != (n,):
        raise ValueError(f"target must be an int or {n} class indices, got shape {list(t.shape)}")
    if bool(((t < 0) | (t >= classes)).any()):
        raise ValueError(f"target classes must be in [0, {classes - 1}], got {t.tolist()}")
    return t


def _scores(output: Any, targets_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out = first_tensor(output)
    if out is None:
        raise ValueError("the model returned no tensor; saliency needs a score to explain")
    t = targets_of(out)
    return out if out.dim() == 1 else out.gather(1, t[:, None]).squeeze(1)


def _input_grad(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """``d score / d x`` per example (one forward and one backward)."""
    if not x.is_floating_point():
        raise ValueError(
            f"saliency needs a float input to differentiate; this one is {x.dtype} (token ids "
            "or class labels have no gradient)"
        )
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        score = _scores(model(leaf), lambda out: resolve_targets(out, target))
        (grad,) = torch.autograd.grad(score.sum(), leaf)
    return grad


def vanilla_gradient(
    model: nn.Module, x: torch.Tensor, target: Target = None, *, absolute: bool = True
) -> torch.Tensor:
    """The gradient of each example's target score with respect to its input.

    Args:
        model: the model (eval mode).
        x: a batch of float inputs ``(N, ...)``.
        target: class per example (see :func:`resolve_targets`).
        absolute: return ``|gradient|`` (the usual saliency map, Captum's default).

    Returns:
        A tensor shaped like ``x``.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[3.0, -4.0]]))
        >>> vanilla_gradient(net, torch.zeros(1, 2))
        tensor([[3., 4.]])
    """
    grad = _input_grad(model, x, target)
    return grad.abs() if absolute else grad


def gradient_x_input(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """``x * d score / d x``: each input's signed contribution, exact for a linear score.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[3.0, -4.0]]))
        >>> gradient_x_input(net, torch.tensor([[1.0, 2.0]]))  # sums to the score, -5
        tensor([[ 3., -8.]])
    """
    return x.detach() * _input_grad(model, x, target)


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    samples: int = 25,
    stdev: float = 0.15,
    absolute: bool = True,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """The vanilla gradient averaged over ``samples`` copies of ``x`` with Gaussian noise.

    The noise is drawn in one call, ``stdev * randn(N * samples, ...)``, and example ``i``'s
    copies are rows ``i * samples ... (i + 1) * samples - 1``: the same numbers Captum's
    ``NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=samples,
    stdevs=stdev)`` gives after the same ``torch.manual_seed``. The target class is fixed from
    the clean input (not re-chosen for every noisy copy).

    Args:
        model: the model (eval mode).
        x: a batch of float inputs ``(N, ...)``.
        target: class per example (see :func:`resolve_targets`).
        samples: noisy copies per example.
        stdev: standard deviation of the noise, in input units. The paper suggests 10-20% of
            the input's value range, e.g. ``0.15 * float(x.max() - x.min())``.
        absolute: average ``|gradient|`` (Captum's default) rather than the signed gradient.
        generator: the random generator (default: torch's global one).
        batch_size: noisy copies per forward pass (default: all ``N * samples`` at once).

    Raises:
        ValueError: ``samples < 1``, ``stdev < 0`` or ``batch_size < 1``.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> g = torch.Generator().manual_seed(0)
        >>> smooth = smoothgrad(net, torch.randn(3, 2), generator=g)
        >>> torch.allclose(smooth, vanilla_gradient(net, torch.randn(3, 2)))  # linear: no change
        True
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if stdev < 0:
        raise ValueError(f"stdev must be >= 0, got {stdev}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not x.is_floating_point():
        _input_grad(model, x, target)  # raises the float-input error
    with torch.no_grad():
        targets = resolve_targets(first_tensor(model(x)).detach(), target)  # type: ignore[union-attr]
    noise = torch.randn(
        (len(x) * samples, *x.shape[1:]), generator=generator, dtype=x.dtype, device=x.device
    )
    noisy = x.detach().repeat_interleave(samples, dim=0) + stdev * noise
    per_copy = targets.repeat_interleave(samples)
    step = batch_size or len(noisy)
    grads = [
        vanilla_gradient(model, chunk, per_copy[i : i + step], absolute=absolute)
        for i, chunk in zip(range(0, len(noisy), step), noisy.split(step), strict=True)
    ]
    return torch.cat(grads).view(len(x), samples, *x.shape[1:]).mean(dim=1)


def default_cam_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The layer Grad-CAM uses by default: the last convolutional feature map of the forward.

    Among the modules that are or contain a convolution (``nn.Conv1d/2d/3d``, transposed ones
    included) and return a 4-D map ``(N, C, H, W)`` larger than 1x1, the one that finishes last
    in the forward pass; when containers pass that same tensor on, the innermost module that
    produced it. For a Kiln ResNet this is the last residual block (after its add and ReLU);
    for ``Sequential(conv, relu, conv, relu, flatten, linear)`` the second conv.

    Raises:
        ValueError: the model has no convolution, or none of them gives a 2-D map.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
        >>> default_cam_layer(net, torch.randn(1, 1, 8, 8))
        '2'
    """
    conv = nn.modules.conv._ConvNd
    if not any(isinstance(m, conv) for m in model.modules()):
        raise ValueError(
            f"Grad-CAM needs a convolutional layer and {type(model).__name__} has none; use "
            "--method gradient, grad_x_input or smoothgrad, which work on any model"
        )
    names = [n for n, m in model.named_modules() if any(isinstance(c, conv) for c in m.modules())]
    finished: list[tuple[str, torch.Tensor]] = []

    def keep(name: str, module: nn.Module, _: tuple[Any, ...], out: Any) -> None:
        t = first_tensor(out)
        if t is not None and t.dim() == 4 and t.shape[-2] * t.shape[-1] > 1:
            finished.append((name, t))

    with torch.no_grad(), forward_hooks(model, keep, names):
        model(x)
    if not finished:
        raise ValueError(
            f"Grad-CAM needs a 2-D feature map (N, C, H, W) and none of "
            f"{type(model).__name__}'s convolutional layers gives one; use --method gradient, "
            "grad_x_input or smoothgrad"
        )
    last = finished[-1][1]
    return next(name for name, t in finished if t is last)


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    layer: str | None = None,
    upsample: bool = True,
    relu: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps of the target class at one convolutional layer.

    With ``A`` the layer's output ``(N, K, h, w)`` and ``g = d score / d A``, the map is
    ``relu(sum_k mean_ij(g_k) * A_k)``: the feature maps weighted by how much the class score
    rises with each. In-place modules are switched off for the pass (:func:`no_inplace`), so an
    in-place ReLU after the layer cannot overwrite the captured map.

    Args:
        model: the model (eval mode).
        x: a batch of inputs ``(N, C, H, W)``.
        target: class per example (see :func:`resolve_targets`).
        layer: the module's dotted name (default: :func:`default_cam_layer`).
        upsample: resize the map to the input's ``H x W`` (bilinear); otherwise ``h x w``.
        relu: keep only the positive part (the paper's map; Captum's ``relu_attributions``).

    Returns:
        ``(N, H, W)`` (or ``(N, h, w)``) maps, not normalised.

    Raises:
        ValueError: no usable layer (see :func:`default_cam_layer`), an unknown name, or a
            layer whose output is not ``(N, K, h, w)``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> grad_cam(net, torch.randn(2, 3, 16, 16), layer="1").shape
        torch.Size([2, 16, 16])
    """
    name = layer if layer is not None else default_cam_layer(model, x)
    select_modules(model, [name])  # a clear error for an unknown name
    # An in-place activation right after the layer would overwrite the captured map.
    with (
        torch.enable_grad(),
        no_inplace(model),
        capture_activations(model, [name], detach=False) as acts,
    ):
        # The input needs no gradient itself, but asking for one keeps the layer in the graph
        # when every parameter before it is frozen.
        leaf = x.detach().clone().requires_grad_(x.is_floating_point())
        score = _scores(model(leaf), lambda out: resolve_targets(out, target))
        if name not in acts:
            raise ValueError(f"layer {name!r} did not run in the forward pass; pick another")
        a = acts[name]
        if a.dim() != 4:
            raise ValueError(
                f"Grad-CAM needs a layer with a 2-D feature map (N, C, H, W); {name!r} gives "
                f"{list(a.shape)}; name a convolutional layer or block instead"
            )
        (g,) = torch.autograd.grad(score.sum(), a)
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1).detach()
    if relu:
        cam = cam.clamp_min(0)
    if upsample:
        if x.dim() != 4:
            raise ValueError(
                f"upsampling needs an image batch (N, C, H, W), got {list(x.shape)}; "
                "pass upsample=False"
            )
        size = (int(x.shape[-2]), int(x.shape[-1]))
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return cam


def saliency(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: Target = None,
    **options: Any,
) -> torch.Tensor:
    """Dispatch to one method by name (``kiln inspect --method``).

    Args:
        model: the model (eval mode).
        x: a batch of inputs.
        method: one of :data:`METHODS`.
        target: class per example (see :func:`resolve_targets`).
        **options: passed to the method (``layer`` for gradcam, ``samples``/``stdev``/
            ``generator`` for smoothgrad).

    Raises:
        ValueError: an unknown method; the message lists them.

    Example:
        >>> saliency(nn.Linear(2, 2), torch.ones(1, 2), "gradient").shape
        torch.Size([1, 2])
    """
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "gradient": vanilla_gradient,
        "grad_x_input": gradient_x_input,
        "smoothgrad": smoothgrad,
        "gradcam": grad_cam,
    }
    if method not in fns:
        raise ValueError(f"unknown saliency method {method!r}; allowed: {', '.join(METHODS)}")
    return fns[method](model, x, target, **options)

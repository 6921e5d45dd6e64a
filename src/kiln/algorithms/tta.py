"""Test-time augmentation (TTA): predict on a few transformed copies of each input and average.

Why: a model is rarely exactly invariant to small changes it should not care about (a shift by a
pixel, a mirror image, measurement noise). Averaging its predicted probabilities over such
*views* of an input smooths those mistakes out, often for a small accuracy gain and better
calibration, at the price of one forward pass per view. Choose only views that keep the label:
a mirrored cat is a cat, but a mirrored digit may not be a digit (see the measured numbers in
``docs/techniques/tta-ensembles.md``).

Views, always added to the input itself:

* ``flip``: the horizontal mirror of an image ``(N, C, H, W)``; ``vflip``: the vertical one.
* ``shift``: four copies moved by ``shift`` pixels left, right, up and down; the border pixels
  are repeated into the gap, so no artificial black edge appears.
* ``noise``: ``noise_views`` copies plus Gaussian noise of std ``noise_std`` (for tables
  ``(N, F)``, whose features Kiln standardises; also valid on images). The noise comes from an
  explicit ``torch.Generator`` seeded with ``seed`` at every call, so the same input batch gives
  the same output; the global RNG is never touched.

:class:`TTA` wraps a model as an ``nn.Module``. For classification (and ``lm``) its output is the
log of the mean softmax probability over the views, so cross-entropy, argmax and the metrics take
it unchanged; for regression it is the mean output. With no transform there is one view, and the
model's output passes through untouched, so identity TTA equals plain evaluation exactly.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(4, 10))
    >>> tta = TTA(net, transforms=("flip", "shift"), task="classification").eval()
    >>> tta(torch.randn(2, 1, 16, 16)).shape   # averaged over 1 + 1 + 4 = 6 views
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.algorithms.ensemble import TASKS, mean_log_prob

__all__ = [
    "IMAGE_TRANSFORMS",
    "TRANSFORMS",
    "TTA",
    "check_transforms",
    "parse_transforms",
    "tta_views",
]

IMAGE_TRANSFORMS = ("flip", "vflip", "shift")
TRANSFORMS = (*IMAGE_TRANSFORMS, "noise")
_SUITS = (
    "flip, vflip and shift suit images (N, C, H, W); noise suits tables (N, F) and images; "
    "token inputs (language models) take none"
)


def parse_transforms(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"flip,shift"`` or ``["flip", "shift"]`` -> ``("flip", "shift")``, checked and deduplicated.

    ``None``, ``""`` and ``"none"`` mean no transform (the input alone).

    Raises:
        ValueError: an unknown name, with the allowed ones.

    Example:
        >>> parse_transforms("flip, shift,flip")
        ('flip', 'shift')
    """
    if spec is None:
        return ()
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRANSFORMS:
            raise ValueError(
                f"unknown TTA transform {raw.strip()!r}; allowed: {', '.join(TRANSFORMS)} "
                f"(comma-separated, e.g. tta=flip,shift). {_SUITS}"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def check_transforms(
    transforms: Sequence[str], input_shape: Sequence[int], *, floating: bool = True
) -> None:
    """Check that ``transforms`` suit inputs of one example's shape ``input_shape``.

    Args:
        transforms: names from :data:`TRANSFORMS`.
        input_shape: one example's shape, without the batch dim: ``(C, H, W)`` for an image.
        floating: whether the inputs are floating point (token ids are not).

    Raises:
        ValueError: which transform does not fit, what the input is, and which transforms do.

    Example:
        >>> check_transforms(["flip"], (64,))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: TTA flip needs image inputs (N, C, H, W), ...
    """
    shape = tuple(input_shape)
    for name in transforms:
        if name in IMAGE_TRANSFORMS and len(shape) != 3:
            raise ValueError(
                f"TTA {name} needs image inputs (N, C, H, W), but one input here has shape "
                f"{shape}; {_SUITS}"
            )
        if name == "noise" and not floating:
            raise ValueError(f"TTA noise needs floating-point inputs, not token ids; {_SUITS}")


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` moved by ``dy`` rows and ``dx`` columns, the edge pixels repeated into the gap."""
    h, w = x.shape[-2:]
    left, right, top, bottom = max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)
    padded = F.pad(x, (left, right, top, bottom), mode="replicate")
    return padded[..., bottom : bottom + h, right : right + w]


def tta_views(
    x: Tensor,
    transforms: Sequence[str],
    *,
    shift: int = 2,
    noise_std: float = 0.1,
    noise_views: int = 4,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The input and its transformed copies (a pure function: nothing else changes).

    Args:
        x: a batch, ``(N, C, H, W)`` for the image transforms.
        transforms: names from :data:`TRANSFORMS`.
        shift: pixels moved by ``shift`` (>= 1, smaller than the image).
        noise_std: standard deviation of the ``noise`` views.
        noise_views: how many noisy copies ``noise`` adds.
        generator: the source of the noise (required for ``noise``, on ``x``'s device).

    Returns:
        ``[x, view_1, ...]``: ``x`` itself first, then the views in the order of ``transforms``.

    Example:
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> [v.flatten().tolist() for v in tta_views(x, ["flip"])]
        [[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 3.0, 2.0]]
    """
    check_transforms(transforms, tuple(x.shape[1:]), floating=x.is_floating_point())
    views = [x]
    for name in transforms:
        if name == "flip":
            views.append(x.flip(-1))
        elif name == "vflip":
            views.append(x.flip(-2))
        elif name == "shift":
            h, w = x.shape[-2:]
            if not 1 <= shift < min(h, w):
                raise ValueError(
                    f"TTA shift must be between 1 and {min(h, w) - 1} pixels for {h}x{w} images, "
                    f"got {shift}"
                )
            views += [
                _shifted(x, dy, dx) for dy, dx in ((0, shift), (0, -shift), (shift, 0), (-shift, 0))
            ]
        elif name == "noise":
            if generator is None:
                raise ValueError("TTA noise needs a torch.Generator (pass generator=...)")
            if noise_views < 1 or not noise_std > 0:
                raise ValueError(
                    f"TTA noise needs noise_views >= 1 and noise_std > 0, got {noise_views} and "
                    f"{noise_std}"
                )
            for _ in range(noise_views):
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                views.append(x + noise_std * eps)
        else:
            raise ValueError(f"unknown TTA transform {name!r}; allowed: {', '.join(TRANSFORMS)}")
    return views


class TTA(nn.Module):
    """A model that predicts on several views of each input and averages (see the module doc).

    Args:
        model: the trained model (put it in eval mode; ``TTA(...).eval()`` does that too).
        transforms: names from :data:`TRANSFORMS`, or one comma-separated string.
        task: ``classification`` or ``lm`` (mean probability) or ``regression`` (mean output).
        shift: pixels moved by the ``shift`` views.
        noise_std: standard deviation of the ``noise`` views.
        noise_views: how many noisy copies ``noise`` adds.
        seed: seeds the noise at every call (the same batch gives the same output).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> tta = TTA(nn.Linear(5, 1), "noise", task="regression", noise_views=8).eval()
        >>> x = torch.randn(3, 5)
        >>> torch.equal(tta(x), tta(x))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        transforms: str | Sequence[str] = ("flip",),
        *,
        task: str = "classification",
        shift: int = 2,
        noise_std: float = 0.1,
        noise_views: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"TTA task must be one of {', '.join(TASKS)}, got {task!r}")
        self.model = model
        self.transforms = parse_transforms(transforms)
        self.task = task
        self.shift = shift
        self.noise_std = noise_std
        self.noise_views = noise_views
        self.seed = seed

    def forward(self, x: Tensor) -> Tensor:
        generator = None
        if "noise" in self.transforms:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        views = tta_views(
            x,
            self.transforms,
            shift=self.shift,
            noise_std=self.noise_std,
            noise_views=self.noise_views,
            generator=generator,
        )
        if len(views) == 1:  # no transform: the model's own output, bit for bit
            return self.model(x)
        outputs = [self.model(v) for v in views]
        if self.task == "regression":
            return torch.stack([o.float() for o in outputs]).mean(0)
        return mean_log_prob(outputs)

    def extra_repr(self) -> str:
        return f"transforms={self.transforms}, task={self.task!r}"

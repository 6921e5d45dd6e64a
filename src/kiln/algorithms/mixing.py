"""Mixup, CutMix and label smoothing as pure functions over a batch.

Why pure functions: the trainer, a user's own loop and the tests all call the same code, and
every random draw comes from an explicit ``torch.Generator`` so a batch is reproducible from
the generator alone and global RNG state (torch, numpy, python) is never touched.

Mixing returns a :class:`MixedBatch` with the mixed inputs, the soft targets ``[N, C]`` and the
``lam`` / ``perm`` (and CutMix ``box``) that produced them, so callers can log or check them.
Train against soft targets with :func:`soft_cross_entropy` (the one in :mod:`kiln.losses`,
re-exported here).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    >>> out = mixup_batch(x, y, alpha=0.4, num_classes=3, generator=g)
    >>> out.inputs.shape, out.targets.shape
    (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]))
    >>> loss = soft_cross_entropy(torch.zeros(4, 3), out.targets)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kiln.losses.classification import soft_cross_entropy

__all__ = [
    "BatchMixer",
    "MixedBatch",
    "cutmix_batch",
    "mixup_batch",
    "sample_beta",
    "smooth_soft",
    "smooth_targets",
    "soft_cross_entropy",
]


class MixedBatch(NamedTuple):
    """The result of :func:`mixup_batch` / :func:`cutmix_batch`.

    Attributes:
        inputs: Mixed inputs, same shape and dtype as ``x``.
        targets: Soft targets ``[N, C]``: ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``.
        lam: Weight of the original batch (for CutMix, recomputed from the clipped box area).
        perm: The batch permutation the original was mixed with (on ``x.device``).
        box: CutMix only: ``(y0, y1, x0, x1)``, the half-open pasted region; ``None`` for mixup.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x_mix, soft, lam, perm, box = mixup_batch(
        ...     torch.ones(2, 3), torch.tensor([0, 1]), alpha=1.0, num_classes=2, generator=g)
        >>> box is None
        True
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lam: float
    perm: torch.Tensor
    box: tuple[int, int, int, int] | None = None


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)`` reproducibly from ``generator`` alone.

    ``torch.distributions.Beta`` and ``torch._standard_gamma`` take no generator, so one 63-bit
    seed is drawn from ``generator`` and seeds a private ``numpy.random.Generator`` (PCG64),
    whose ``beta`` is exact. Neither torch's nor numpy's global state is used.

    Args:
        alpha: Concentration, ``> 0``; small values give ``lam`` near 0 or 1.
        generator: Source of randomness; advanced by one ``randint`` draw.

    Returns:
        A float in ``[0, 1]``.

    Raises:
        ValueError: If ``alpha`` is not a finite number ``> 0``.

    Example:
        >>> lam = sample_beta(0.4, torch.Generator().manual_seed(0))
        >>> 0.0 <= lam <= 1.0
        True
    """
    _check_alpha(alpha)
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float,
    num_classes: int,
    generator: torch.Generator,
) -> MixedBatch:
    """Mixup (Zhang et al., 2018): blend each sample with a permuted partner.

    ``inputs = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)`` (one ``lam``
    per batch) and ``perm = randperm(N)``, both drawn from ``generator``.

    Args:
        x: Floating inputs ``[N, ...]``.
        y: Integer class targets ``[N]`` in ``[0, num_classes)``.
        alpha: Beta concentration, ``> 0`` (0.2-0.4 is common for images).
        num_classes: Number of classes ``C``.
        generator: Source of all randomness (on CPU, or on the device of ``x``).

    Returns:
        A :class:`MixedBatch` (``box`` is ``None``).

    Raises:
        ValueError: On a bad ``alpha``, non-floating ``x``, or targets of the wrong shape,
            dtype or range.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> out = mixup_batch(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]),
        ...                   alpha=0.2, num_classes=4, generator=g)
        >>> torch.allclose(out.targets.sum(1), torch.ones(4))
        True
    """
    _check_batch(x, y, num_classes)
    lam = sample_beta(alpha, generator)
    perm = _randperm(len(x), generator, x.device)
    inputs = torch.lerp(x[perm], x, lam)  # lam * x + (1 - lam) * x[perm]
    return MixedBatch(inputs, _mix_targets(y, perm, lam, num_classes, x.dtype), lam, perm)


def cutmix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float,
    num_classes: int,
    generator: torch.Generator,
) -> MixedBatch:
    """CutMix (Yun et al., 2019): paste a box from a permuted partner into each image.

    With ``lam ~ Beta(alpha, alpha)``, a box of side ``int(H * sqrt(1 - lam))`` by
    ``int(W * sqrt(1 - lam))`` (area fraction ~``1 - lam``) is centred at a uniform random
    pixel and clipped to the image; the same box is used for the whole batch. ``lam`` is then
    recomputed exactly as ``1 - box_area / (H * W)`` so the targets match the pixels.

    Args:
        x: Images ``[N, C, H, W]`` (any dtype; pixels are copied, not blended).
        y: Integer class targets ``[N]`` in ``[0, num_classes)``.
        alpha: Beta concentration, ``> 0`` (1.0 is common).
        num_classes: Number of classes ``C``.
        generator: Source of all randomness (on CPU, or on the device of ``x``).

    Returns:
        A :class:`MixedBatch` with ``box = (y0, y1, x0, x1)``, the half-open pasted region.

    Raises:
        ValueError: On a bad ``alpha``, ``x`` not 4-D, or bad targets.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> out = cutmix_batch(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]),
        ...                    alpha=1.0, num_classes=2, generator=g)
        >>> y0, y1, x0, x1 = out.box
        >>> out.lam == 1 - (y1 - y0) * (x1 - x0) / 64
        True
    """
    if x.ndim != 4:
        raise ValueError(
            f"cutmix_batch expects images [N, C, H, W] (4-D), got shape {tuple(x.shape)}; "
            "use mixup_batch for other inputs"
        )
    _check_batch(x, y, num_classes, need_float=False)
    lam = sample_beta(alpha, generator)
    perm = _randperm(len(x), generator, x.device)
    h, w = x.shape[-2:]
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (1,), generator=generator, device=generator.device))
    cx = int(torch.randint(0, w, (1,), generator=generator, device=generator.device))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    inputs = x.clone()
    inputs[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    targets = _mix_targets(y, perm, lam, num_classes, x.dtype)
    return MixedBatch(inputs, targets, lam, perm, (y0, y1, x0, x1))


def smooth_targets(
    y: torch.Tensor, num_classes: int, smoothing: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Label-smoothed one-hot targets ``(1 - s) * onehot(y) + s / C``.

    ``soft_cross_entropy(logits, smooth_targets(y, C, s))`` equals
    ``F.cross_entropy(logits, y, label_smoothing=s)``.

    Args:
        y: Integer class targets ``[N]`` in ``[0, num_classes)``.
        num_classes: Number of classes ``C``.
        smoothing: ``s`` in ``[0, 1)``.
        dtype: Floating dtype of the result.

    Returns:
        Soft targets ``[N, C]``.

    Raises:
        ValueError: On bad targets or ``smoothing`` outside ``[0, 1)``.

    Example:
        >>> smooth_targets(torch.tensor([1]), 2, 0.2)
        tensor([[0.1000, 0.9000]])
    """
    _check_targets(y, num_classes)
    return smooth_soft(F.one_hot(y, num_classes).to(dtype), smoothing)


def smooth_soft(soft: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing for already-soft targets: ``(1 - s) * soft + s / C``.

    Use after mixup/cutmix; rows that sum to 1 still sum to 1.

    Args:
        soft: Floating targets ``[..., C]``.
        smoothing: ``s`` in ``[0, 1)``.

    Returns:
        Smoothed targets, same shape and dtype.

    Raises:
        ValueError: If ``smoothing`` is outside ``[0, 1)`` or ``soft`` is not floating.

    Example:
        >>> smooth_soft(torch.tensor([[0.5, 0.5, 0.0, 0.0]]), 0.4)
        tensor([[0.4000, 0.4000, 0.1000, 0.1000]])
    """
    if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
        raise ValueError(f"smoothing must be a float in [0, 1), got {smoothing!r}; 0.1 is common")
    if not soft.is_floating_point() or soft.ndim < 1:
        raise ValueError(
            f"soft targets must be a floating tensor [..., C], got dtype {soft.dtype} "
            f"shape {tuple(soft.shape)}"
        )
    return soft * (1.0 - smoothing) + smoothing / soft.shape[-1]


class BatchMixer:
    """Mixup and/or CutMix for a training loop, with all randomness in one generator.

    Per batch: with probability ``prob`` the batch is mixed; when both methods are on, CutMix
    is chosen with probability ``switch_prob``, else Mixup. Batches of the last
    ``off_last_epochs`` epochs (of ``epochs``) pass through unmixed, with hard targets.
    Mixed batches get soft targets ``[N, C]``; ``F.cross_entropy`` takes them as they are
    (with ``label_smoothing`` applied to them, like :func:`smooth_soft`).

    The generator's state is part of :meth:`state_dict`, so a resumed run draws the same
    ``lam``, permutations and boxes as an uninterrupted one.

    Args:
        num_classes: Number of classes ``C``.
        mixup_alpha: Beta concentration for Mixup; 0 disables it.
        cutmix_alpha: Beta concentration for CutMix; 0 disables it (needs 4-D images).
        prob: Chance that a batch is mixed at all.
        switch_prob: Chance of CutMix when both are on.
        off_last_epochs: Train the last N epochs without mixing.
        epochs: Total epochs (for ``off_last_epochs``).
        seed: Seed of the private generator (add the rank under several processes).

    Example:
        >>> mixer = BatchMixer(10, mixup_alpha=0.2, seed=0)
        >>> x, y = mixer(torch.randn(8, 64), torch.randint(0, 10, (8,)), epoch=0)
        >>> y.shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        off_last_epochs: int = 0,
        epochs: int | None = None,
        seed: int = 0,
    ) -> None:
        for a in (mixup_alpha, cutmix_alpha):
            if a != 0:
                _check_alpha(a)
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        for name, v in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if off_last_epochs and epochs is None:
            raise ValueError("off_last_epochs needs epochs (the run's length)")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.last_epoch = (epochs - off_last_epochs) if off_last_epochs and epochs else None
        self.generator = torch.Generator().manual_seed(seed)

    def active(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` (0-based) may be mixed."""
        return self.last_epoch is None or epoch < self.last_epoch

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, *, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for one training batch (soft targets when mixed)."""
        if not self.active(epoch):
            return x, y
        g = self.generator
        if self.prob < 1.0 and float(torch.rand((), generator=g)) >= self.prob:
            return x, y
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or float(torch.rand((), generator=g)) < self.switch_prob
        )
        if use_cutmix:
            out = cutmix_batch(
                x, y, alpha=self.cutmix_alpha, num_classes=self.num_classes, generator=g
            )
        else:
            out = mixup_batch(
                x, y, alpha=self.mixup_alpha, num_classes=self.num_classes, generator=g
            )
        return out.inputs, out.targets

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state (a uint8 tensor), loadable with ``weights_only=True``."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha must be a finite number > 0 (Beta(alpha, alpha)), got {alpha!r}; "
            "0.2-0.4 is common for mixup, 1.0 for cutmix; to disable, skip the call"
        )


def _check_targets(y: torch.Tensor, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer class indices of shape [N], got dtype {y.dtype} shape "
            f"{tuple(y.shape)}; for soft targets use smooth_soft"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}) for num_classes={num_classes}, got min "
            f"{int(y.min())} max {int(y.max())}; check num_classes"
        )


def _check_batch(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, need_float: bool = True
) -> None:
    _check_targets(y, num_classes)
    if x.ndim < 1 or len(x) != len(y):
        raise ValueError(
            f"inputs [N, ...] and targets [N] must share the batch size, got x shape "
            f"{tuple(x.shape)} and y shape {tuple(y.shape)}"
        )
    if need_float and not x.is_floating_point():
        raise ValueError(f"mixup needs floating inputs to blend, got dtype {x.dtype}; cast x first")


def _randperm(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's device (a CPU generator cannot drive a CUDA randperm), then moved.
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def _mix_targets(
    y: torch.Tensor, perm: torch.Tensor, lam: float, num_classes: int, dtype: torch.dtype
) -> torch.Tensor:
    dtype = dtype if dtype.is_floating_point else torch.float32
    onehot = F.one_hot(y, num_classes).to(dtype)
    return torch.lerp(onehot[perm], onehot, lam)  # lam * onehot + (1 - lam) * onehot[perm]

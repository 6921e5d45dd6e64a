"""Class losses: weighted and soft cross-entropy, focal loss, and class weights from counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kiln.losses._common import (
    _as_weight,
    _check_class_targets,
    _check_classes_on_cpu,
    _check_reduction,
    _desc,
    _flatten,
    _reduce,
    _weight_for,
)


def class_weights_from_counts(counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1.

    ``w_c = (1 / n_c) / mean_k(1 / n_k)``: a class with half the examples weighs twice as much,
    and the average weight is 1, so the loss keeps the scale of plain cross-entropy when the
    classes are balanced (all weights are then exactly 1).

    Args:
        counts: Examples per class ``[C]`` in the training split.

    Returns:
        Float32 weights ``[C]``.

    Raises:
        ValueError: If ``counts`` is not 1-D, is negative, or a class has no examples (its
            weight would be infinite; give ``class_weights`` as a list instead).

    Example:
        >>> class_weights_from_counts(torch.tensor([10, 30, 60]))
        tensor([2.0000, 0.6667, 0.3333])
    """
    n = torch.as_tensor(counts).detach().cpu().double()
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"class counts must be 1-D [C] (examples per class), got {list(n.shape)}")
    if bool((n <= 0).any()):
        empty = torch.nonzero(n <= 0).flatten().tolist()
        raise ValueError(
            f"class_weights=auto: classes {empty} have no training examples, so their inverse "
            f"frequency is infinite; give loss.class_weights as a list of {n.numel()} numbers"
        )
    inv = 1.0 / n
    return (inv / inv.mean()).float()


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | Sequence[float] | None = None,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy with per-class weights, averaged over samples.

    Per sample, with target distribution ``t`` (one-hot, or soft from mixup), smoothed to
    ``(1 - s) t + s / C`` and predicted ``q = softmax(logits)``:
    ``loss = -sum_c w_c t_c log q_c``. This is ``F.cross_entropy(weight=w, reduction="none")``;
    ``mean`` is the sum divided by the number of samples (``[B, T, V]`` logits: ``B*T``
    tokens), not by the summed weights of the targets as in PyTorch.

    Args:
        logits: ``[N, C]``, or ``[B, T, V]`` for a language model.
        target: Class indices ``[N]`` (``[B, T]``), or probabilities of the logits' shape.
        weight: ``[C]`` class weights; ``None`` is plain cross-entropy.
        label_smoothing: ``s`` in ``[0, 1)``.
        reduction: ``mean``, ``sum`` or ``none`` (shape ``[N]`` / ``[B, T]``).

    Returns:
        The loss (float32 for half-precision logits).

    Raises:
        ValueError: On wrong shapes/dtypes, a weight count that is not ``C``, or a bad
            ``reduction``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> weighted_cross_entropy(logits, torch.tensor([0, 0]), [3.0, 1.0], reduction="none")
        tensor([0.3808, 6.3808])
    """
    return _class_cross_entropy(
        "weighted cross-entropy", logits, target, weight, label_smoothing, reduction
    )


def soft_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy against soft targets: ``-(soft * log_softmax(logits)).sum(-1)`` per row.

    The targets of mixup/cutmix and label smoothing (:mod:`kiln.algorithms.mixing`). This is
    :func:`weighted_cross_entropy` without class weights, refusing class indices.

    Args:
        logits: Unnormalised scores ``[N, C]`` (``[B, T, V]`` for a language model).
        soft_targets: Probabilities of the logits' shape (rows summing to 1).
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (shape ``logits.shape[:-1]``).

    Returns:
        The loss; a scalar unless ``reduction="none"`` (float32 for half-precision logits).

    Raises:
        ValueError: If the targets are not probabilities of the logits' shape or ``reduction``
            is unknown.

    Example:
        >>> soft_cross_entropy(torch.zeros(2, 4), torch.full((2, 4), 0.25))  # ln 4
        tensor(1.3863)
    """
    what = "soft cross-entropy"
    if not soft_targets.is_floating_point() or soft_targets.shape != logits.shape:
        raise ValueError(
            f"{what}: soft_targets must be probabilities of the logits' shape "
            f"{list(logits.shape)}, got {_desc(soft_targets)}; build them with "
            "kiln.algorithms.mixing.smooth_targets or mixup_batch (class indices: use "
            "weighted_cross_entropy)"
        )
    return _class_cross_entropy(what, logits, soft_targets, None, 0.0, reduction)


def _class_cross_entropy(
    what: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | Sequence[float] | None,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    _check_class_targets(what, logits, target, soft_ok=True, dims=(2, 3))
    flat, t = _flatten(logits, target)
    _check_reduction(what, reduction)
    if t.dim() == 1:
        _check_classes_on_cpu(what, t, flat.shape[-1])
    w = None if weight is None else _as_weight(what, weight)
    loss = F.cross_entropy(
        flat,
        t,
        weight=_weight_for(what, w, flat),
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return _reduce(loss.reshape(logits.shape[:-1]), reduction)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): cross-entropy that down-weights easy examples.

    Per sample with true class ``y`` and ``p_t = softmax(logits)[y]``:
    ``loss = -alpha_y (1 - p_t)^gamma log p_t``. ``gamma = 0`` without ``alpha`` is
    cross-entropy. ``alpha`` is a list (one weight per class, e.g. inverse frequencies; for the
    paper's binary ``alpha``-balancing give ``[1 - a, a]``) or a scalar, which scales every class
    alike. With label smoothing every class is a target with mass ``t_c = (1 - s) [c = y] + s/C``
    and ``loss = -sum_c alpha_c t_c (1 - p_c)^gamma log p_c``; at ``gamma = 0`` this is
    ``F.cross_entropy(weight=alpha, label_smoothing=s)`` per sample. ``mean`` divides by the
    number of samples.

    Args:
        logits: ``[N, C]``, or ``[B, T, V]`` for a language model.
        target: Class indices ``[N]`` (``[B, T]``); soft targets are refused.
        gamma: Focusing parameter ``>= 0`` (the paper uses 2).
        alpha: Per-class weights ``[C]``, a scalar, or ``None``.
        label_smoothing: ``s`` in ``[0, 1)``.
        reduction: ``mean``, ``sum`` or ``none``.

    Returns:
        The loss (float32 for half-precision logits).

    Raises:
        ValueError: On wrong shapes/dtypes (one-hot or soft targets included), ``gamma < 0``,
            ``label_smoothing`` outside ``[0, 1)``, a weight count that is not ``C``, or a bad
            ``reduction``.

    Example:
        >>> logits = torch.log(torch.tensor([[0.5, 0.5]]))  # p_t = 0.5
        >>> focal_loss(logits, torch.tensor([0]), gamma=2.0)  # 0.25 * ln 2
        tensor(0.1733)
    """
    what = "focal loss"
    _check_class_targets(what, logits, target, soft_ok=False, dims=(2, 3))
    flat, t = _flatten(logits, target)
    _check_reduction(what, reduction)
    if not gamma >= 0:
        raise ValueError(f"{what}: gamma must be >= 0, got {gamma}; 2 is the paper's value")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{what}: label_smoothing must be in [0, 1), got {label_smoothing}")
    c = flat.shape[-1]
    _check_classes_on_cpu(what, t, c)
    if alpha is None or isinstance(alpha, (int, float)):
        a: torch.Tensor | float | None = alpha
    else:
        a = _weight_for(what, _as_weight(what, alpha), flat)
    logp = F.log_softmax(flat, dim=-1)
    if label_smoothing == 0.0:
        logp_t = logp.gather(1, t[:, None]).squeeze(1)
        # 1 - p_t as -expm1(log p_t) keeps precision near p_t = 1; the clamp keeps the gradient of
        # (1 - p_t)^gamma finite there for gamma < 1 (it is zero at the clamp).
        loss = -(-torch.expm1(logp_t)).clamp(min=1e-12).pow(gamma) * logp_t
        if isinstance(a, torch.Tensor):
            loss = loss * a[t]
    else:
        soft = F.one_hot(t, c).to(logp.dtype) * (1.0 - label_smoothing) + label_smoothing / c
        if isinstance(a, torch.Tensor):
            soft = soft * a
        loss = -(soft * (-torch.expm1(logp)).clamp(min=1e-12).pow(gamma) * logp).sum(-1)
    if isinstance(a, (int, float)):
        loss = loss * a
    return _reduce(loss.reshape(logits.shape[:-1]), reduction)

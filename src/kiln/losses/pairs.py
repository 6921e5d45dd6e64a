"""Losses over pairs and triplets of embeddings (Siamese and metric learning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kiln.losses._common import _check_reduction, _desc, _reduce


def _check_embeddings(what: str, names: Sequence[str], *xs: torch.Tensor) -> None:
    first = xs[0]
    for name, x in zip(names, xs, strict=True):
        if not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{what}: {name} must be floating [N, D] embeddings, got {_desc(x)}")
        if x.shape != first.shape:
            raise ValueError(
                f"{what}: {names[0]} and {name} must have the same shape, got "
                f"{list(first.shape)} and {list(x.shape)}; embed both with the same network"
            )


def _similar(what: str, target: torch.Tensor, n: int) -> torch.Tensor:
    """Pair labels ``[N]`` (1 = similar, 0 or -1 = dissimilar) as a boolean mask."""
    if target.dim() != 1 or target.numel() != n or target.is_complex():
        raise ValueError(
            f"{what}: targets must be pair labels of shape [{n}] (1 = similar, 0 or -1 = "
            f"dissimilar), got {_desc(target)}"
        )
    if target.device.type == "cpu" and not bool(
        ((target == 1) | (target == 0) | (target == -1)).all()
    ):
        raise ValueError(
            f"{what}: pair labels must be 1 (similar) or 0/-1 (dissimilar), got values "
            f"{sorted(set(target.tolist()))}"
        )
    return target == 1


def contrastive_loss(
    x1: torch.Tensor,
    x2: torch.Tensor,
    target: torch.Tensor,
    *,
    margin: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Contrastive loss for Siamese pairs (Hadsell, Chopra and LeCun 2006).

    With ``d = ||x1 - x2||_2`` (computed as ``F.pairwise_distance``, which adds ``1e-6`` to the
    difference so the gradient at ``d = 0`` is finite): a similar pair (``y = 1``) costs
    ``d^2``, a dissimilar pair (``y = 0`` or ``-1``) costs ``max(0, margin - d)^2``. Convention:
    ``1`` means *similar*, the reverse of the paper's ``Y = 0``, and the paper's factor 1/2 is
    left out (it only rescales the learning rate). Dissimilar pairs further apart than
    ``margin`` cost nothing.

    Args:
        x1: Embeddings ``[N, D]`` of the first items.
        x2: Embeddings ``[N, D]`` of the second items.
        target: Pair labels ``[N]`` (bool, integer or float): 1 similar, 0 or -1 dissimilar.
        margin: Distance beyond which dissimilar pairs cost nothing (``> 0``).
        reduction: ``mean``, ``sum`` or ``none``.

    Returns:
        The loss.

    Raises:
        ValueError: On wrong shapes/dtypes, labels other than 1/0/-1 (checked for CPU tensors),
            ``margin <= 0`` or a bad ``reduction``.

    Example:
        >>> a, b = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.3, 0.4], [0.3, 0.4]])
        >>> contrastive_loss(a, b, torch.tensor([1, 0]), margin=1.0, reduction="none")  # d=0.5
        tensor([0.2500, 0.2500])
    """
    what = "contrastive loss"
    _check_embeddings(what, ("x1", "x2"), x1, x2)
    _check_reduction(what, reduction)
    if not margin > 0:
        raise ValueError(f"{what}: margin must be > 0, got {margin}")
    similar = _similar(what, target, len(x1))
    d = F.pairwise_distance(x1, x2)
    loss = torch.where(similar, d.pow(2), (margin - d).clamp(min=0).pow(2))
    return _reduce(loss, reduction)


def cosine_embedding_loss(
    x1: torch.Tensor,
    x2: torch.Tensor,
    target: torch.Tensor,
    *,
    margin: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cosine-embedding loss: ``1 - cos`` for similar pairs, ``max(0, cos - margin)`` otherwise.

    ``F.cosine_embedding_loss`` with checked inputs; labels may be ``1/-1`` (PyTorch's) or
    ``1/0`` (as in :func:`contrastive_loss`).

    Args:
        x1: Embeddings ``[N, D]``.
        x2: Embeddings ``[N, D]``.
        target: Pair labels ``[N]``: 1 similar, 0 or -1 dissimilar.
        margin: In ``[-1, 1]``; 0 to 0.5 is usual.
        reduction: ``mean``, ``sum`` or ``none``.

    Returns:
        The loss.

    Raises:
        ValueError: On wrong shapes/dtypes or labels, ``margin`` outside ``[-1, 1]`` or a bad
            ``reduction``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> cosine_embedding_loss(x, torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([1, 0]))
        tensor(0.8536)
    """
    what = "cosine-embedding loss"
    _check_embeddings(what, ("x1", "x2"), x1, x2)
    if not -1.0 <= margin <= 1.0:
        raise ValueError(f"{what}: margin must be in [-1, 1], got {margin}")
    _check_reduction(what, reduction)
    y = torch.where(_similar(what, target, len(x1)), 1.0, -1.0).to(x1.dtype)
    return F.cosine_embedding_loss(x1, x2, y, margin=margin, reduction=reduction)


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 1.0,
    p: float = 2.0,
    swap: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet margin loss: ``max(0, d(a, p) - d(a, n) + margin)`` (Schroff et al. 2015).

    ``F.triplet_margin_loss`` with checked inputs; ``d`` is the ``p``-norm distance and
    ``swap`` uses ``min(d(a, n), d(p, n))`` as the negative distance (Balntas et al. 2016).

    Args:
        anchor: Embeddings ``[N, D]``.
        positive: Embeddings ``[N, D]`` of the same identity as the anchors.
        negative: Embeddings ``[N, D]`` of another identity.
        margin: How much closer positives must be than negatives (``> 0``).
        p: Norm degree of the distance.
        swap: Use the distance swap.
        reduction: ``mean``, ``sum`` or ``none``.

    Returns:
        The loss.

    Raises:
        ValueError: On wrong shapes/dtypes, ``margin <= 0`` or a bad ``reduction``.

    Example:
        >>> a = torch.zeros(1, 2)
        >>> triplet_loss(a, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.5]]), margin=1.0)
        tensor(0.5000)
    """
    what = "triplet loss"
    _check_embeddings(what, ("anchor", "positive", "negative"), anchor, positive, negative)
    if not margin > 0:
        raise ValueError(f"{what}: margin must be > 0, got {margin}")
    _check_reduction(what, reduction)
    return F.triplet_margin_loss(
        anchor, positive, negative, margin=margin, p=p, swap=swap, reduction=reduction
    )

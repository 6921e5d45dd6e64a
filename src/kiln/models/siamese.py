"""A Siamese network: one tower, applied to both inputs of a pair, with shared weights.

Why: metric learning (same/different pairs, signature or face verification, duplicate
detection) needs both inputs embedded by the *same* function. Registering one tower and calling
it twice is the whole trick: the network has the parameters of one tower, and autograd adds the
gradient of both branches into the shared weights (``grad = grad_branch1 + grad_branch2``).
Registering two copies (``copy.deepcopy(tower)``) would instead train two independent towers.

The tower runs once per input rather than once on ``torch.cat([x1, x2])``: concatenating would
be one call instead of two, but a BatchNorm in the tower would then normalise each branch with
statistics of both, so the two branches would no longer be the same function of their input.

The API is built for contrastive losses: :meth:`Siamese.embed` gives ``(N, D)`` embeddings,
``forward(x1, x2)`` the pair of embeddings, and :meth:`Siamese.distance` a distance per pair
(Euclidean or cosine) to feed a margin loss. ``torch.nn.CosineEmbeddingLoss`` and
``torch.nn.TripletMarginLoss`` take the embeddings directly.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = Siamese(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    >>> z1, z2 = net(torch.randn(5, 8), torch.randn(5, 8))
    >>> z1.shape, net.distance(z1, z2).shape
    (torch.Size([5, 4]), torch.Size([5]))
    >>> same = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])  # contrastive loss, margin 1
    >>> d = net.distance(z1, z2)
    >>> loss = (same * d**2 + (1 - same) * torch.relu(1.0 - d) ** 2).mean() / 2
    >>> loss.backward()
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METRICS", "Metric", "Siamese", "pair_distance"]

Metric = Literal["euclidean", "cosine"]
#: Distances :func:`pair_distance` and :class:`Siamese` accept.
METRICS: tuple[str, ...] = get_args(Metric)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric {metric!r}; allowed: {', '.join(METRICS)}")


def pair_distance(z1: torch.Tensor, z2: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Distance between the rows of two ``(N, D)`` embedding batches, one value per pair.

    ``euclidean`` is ``||z1 - z2 + 1e-6||_2`` (``F.pairwise_distance``: the small offset keeps
    the gradient finite for identical embeddings); ``cosine`` is ``1 - cos(z1, z2)``, in
    ``[0, 2]``.

    Args:
        z1: embeddings of the first inputs, ``(N, D)``.
        z2: embeddings of the second inputs, ``(N, D)``.
        metric: ``euclidean`` or ``cosine``.

    Returns:
        ``(N,)`` distances.

    Raises:
        ValueError: unknown ``metric``, or the two batches differ in shape.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
        >>> round(pair_distance(a, b).item(), 4), pair_distance(a, b, "cosine").item()
        (5.0, 1.0)
    """
    _check_metric(metric)
    if z1.shape != z2.shape:
        raise ValueError(
            f"the two embedding batches must have the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}"
        )
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(z1, z2, dim=-1)
    return F.pairwise_distance(z1, z2)


class Siamese(nn.Module):
    """Twin network around one ``tower``: both inputs go through the same weights.

    Args:
        tower: maps a batch of inputs to embeddings; outputs with more than 2 dims are
            flattened to ``(N, D)``.
        metric: the distance of :meth:`distance`, ``euclidean`` or ``cosine``.
        normalize: L2-normalise the embeddings (then Euclidean distance is in ``[0, 2]`` and a
            monotone function of the cosine distance).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> tower = nn.Linear(6, 3)
        >>> net = Siamese(tower, metric="cosine", normalize=True)
        >>> sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tower.parameters())
        True
        >>> x = torch.randn(2, 6)
        >>> net.distance(*net(x, x)).abs().max().item() < 1e-6  # same input, same embedding
        True
    """

    def __init__(self, tower: nn.Module, metric: Metric = "euclidean", normalize: bool = False):
        super().__init__()
        if not isinstance(tower, nn.Module):
            raise TypeError(f"Siamese needs an nn.Module tower, got {type(tower).__name__!r}")
        _check_metric(metric)
        self.tower = tower
        self.metric = metric
        self.normalize = normalize

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One branch: ``(N, ...) -> (N, D)`` embeddings (use it alone at inference, to index
        a gallery once and compare queries against it)."""
        z = self.tower(x)
        if z.dim() > 2:
            z = z.flatten(1)
        elif z.dim() < 2:
            raise ValueError(
                f"the tower must return (N, D) embeddings, got shape {tuple(z.shape)}; end it "
                "with a layer that keeps the batch dimension"
            )
        return F.normalize(z, dim=1) if self.normalize else z

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of both inputs of each pair, ``((N, D), (N, D))``."""
        return self.embed(x1), self.embed(x2)

    def distance(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``(N,)`` distances between embeddings with this network's metric
        (:func:`pair_distance`)."""
        return pair_distance(z1, z2, self.metric)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, normalize={self.normalize}"

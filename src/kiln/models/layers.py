"""Small building blocks shared by Kiln's models: stochastic depth (DropPath).

Stochastic depth (Huang et al., 2016, "Deep Networks with Stochastic Depth") drops a residual
block's branch for a random subset of the samples in a batch during training, so each sample
sees a shallower network and the blocks learn to work in many combinations; at evaluation the
full network runs. It regularises deep residual nets (ResNets, vision transformers, GPT-style
decoders) where plain dropout inside the branch helps less.

Three pieces, usable without the rest of Kiln:

* :func:`drop_path` is the pure function: zero the branch for each sample with probability
  ``rate``, scale the kept samples by ``1 / (1 - rate)`` so the expectation is unchanged.
* :class:`DropPath` is the module wrapper; it follows ``module.training`` like ``nn.Dropout``.
* :func:`drop_path_rates` is the linear rule: block ``i`` of ``n`` drops with probability
  ``rate * i / (n - 1)`` (0 for the first block, ``rate`` for the last), as in timm, DeiT and
  ConvNeXt. Early blocks compute features every later block needs, so they are dropped least.

Randomness comes from the global torch RNG, exactly like ``nn.Dropout``: seeding with
``torch.manual_seed`` fixes the masks, and a checkpoint that stores ``torch.get_rng_state()``
resumes them exactly. Activation checkpointing (``torch.utils.checkpoint``) stashes and restores
that RNG state around its recomputation, so a checkpointed block draws the same masks twice.

Example:
    >>> import torch
    >>> drop = DropPath(0.25)
    >>> branch = torch.ones(8, 3)
    >>> drop.eval()(branch).equal(branch)  # identity outside training
    True
    >>> drop_path_rates(0.1, 3)
    [0.0, 0.05, 0.1]
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DropPath", "drop_path", "drop_path_rates"]


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(
            f"drop_path rate must be a float in [0, 1), got {rate!r}; typical values are "
            "0.05-0.2 for small nets and up to 0.5 for very deep ones (0 disables it)"
        )


def drop_path(x: torch.Tensor, rate: float, training: bool = True) -> torch.Tensor:
    """Zero ``x`` for each sample (dim 0) with probability ``rate``; scale the rest by
    ``1 / (1 - rate)``.

    Apply it to a residual *branch* before it is added to the shortcut: a dropped sample then
    passes through the block as its shortcut alone. The mask is drawn from the global torch RNG
    on ``x``'s device, one value per sample, broadcast over the other dimensions.

    Args:
        x: the branch output, ``(N, ...)``.
        rate: probability of dropping each sample's branch, in ``[0, 1)``.
        training: when False (evaluation), ``x`` is returned unchanged.

    Returns:
        A tensor of ``x``'s shape and dtype; ``x`` itself when ``rate == 0`` or not training.

    Raises:
        ValueError: ``rate`` is outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> out = drop_path(torch.ones(6, 2), 0.5)
        >>> sorted(set(out.flatten().tolist()))  # dropped samples are 0, kept ones 1 / 0.5
        [0.0, 2.0]
    """
    _check_rate(rate)
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    # One Bernoulli draw per sample, broadcast over the remaining dims (works for any rank).
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def drop_path_rates(rate: float, n_blocks: int) -> list[float]:
    """Per-block drop rates that grow linearly with depth, from 0 (first block) to ``rate``.

    Block ``i`` (0-based) of ``n_blocks`` gets ``rate * i / (n_blocks - 1)``; one block gets 0,
    since with this rule the first block is never dropped.

    Args:
        rate: the rate of the last block, in ``[0, 1)``.
        n_blocks: how many residual blocks the network has, ``>= 1``.

    Returns:
        ``n_blocks`` floats, non-decreasing.

    Raises:
        ValueError: ``rate`` is outside ``[0, 1)`` or ``n_blocks < 1``.

    Example:
        >>> drop_path_rates(0.2, 5)
        [0.0, 0.05, 0.1, 0.15000000000000002, 0.2]
    """
    _check_rate(rate)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    if n_blocks == 1:
        return [0.0]
    return [rate * i / (n_blocks - 1) for i in range(n_blocks)]


class DropPath(nn.Module):
    """Stochastic depth for one residual branch: :func:`drop_path` in training mode, identity in
    evaluation mode.

    It has no parameters or buffers, so adding it to a block leaves ``state_dict()`` unchanged.

    Args:
        rate: probability of dropping each sample's branch, in ``[0, 1)``; 0 makes it an
            identity.

    Raises:
        ValueError: ``rate`` is outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.branch = nn.Linear(4, 4)
        ...         self.drop_path = DropPath(0.1)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x + self.drop_path(self.branch(x))
        >>> Block()(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        _check_rate(rate)
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with whole samples zeroed (and the rest rescaled) in training mode."""
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"

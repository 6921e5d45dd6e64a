"""Small training helpers shared by model tests."""

from __future__ import annotations

import torch
from torch import nn


def overfit_losses(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30
) -> list[float]:
    """Adam on one fixed batch; the losses per step (a model that can learn drives them down)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

"""Stand-ins for a user's own code, imported by path in the registry tests ("usermodels:TinyNet").

The tests put this folder on ``sys.path`` themselves, the way a user's package would be on
``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NOT_CALLABLE = 3


class TinyNet(nn.Module):
    """A linear classifier that asks for ``in_features`` and ``num_classes`` by name."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = scale
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(x)) * self.scale


class OOMNet(TinyNet):
    """TinyNet whose training forward fails like the CPU allocator above ``limit`` examples."""

    def __init__(self, in_features: int, num_classes: int, limit: int = 16) -> None:
        super().__init__(in_features, num_classes)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(x) > self.limit:
            torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: the allocator refuses
        return super().forward(x)


class KwargsNet(nn.Module):
    """Takes ``**extra``: the registry must not check its kwargs nor inject into ``extra``."""

    def __init__(self, out_features: int, **extra: Any) -> None:
        super().__init__()
        self.out_features = out_features
        self.extra = extra
        self.fc = nn.Linear(3, out_features)


def make_net(in_features: int, width: int = 4) -> nn.Module:
    """A factory function instead of a class."""
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, 1))


def not_a_module(in_features: int) -> int:
    """Returns something that is not an ``nn.Module``."""
    return in_features

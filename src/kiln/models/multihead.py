"""A shared trunk with one head per task, for multi-target data (``model.name=multihead``).

The forward returns a dict ``{task name: output}``: logits ``[N, C]`` for a classification task,
``[N, 1]`` for a regression task. Kiln's multi-task loss and metrics read the outputs by name,
so the heads' order does not matter and a user's own multi-head module works the same way as
long as it returns such a dict.

Example:
    >>> from kiln.data.base import DataInfo
    >>> info = DataInfo("multitask", (8,), tasks=[
    ...     {"name": "kind", "task": "classification", "num_classes": 3},
    ...     {"name": "size", "task": "regression"}])
    >>> out = build_multihead(info, hidden=(16,))(torch.zeros(2, 8))
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'kind': (2, 3), 'size': (2, 1)}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kiln.data.base import DataInfo

__all__ = ["MultiHead", "build_multihead"]


class MultiHead(nn.Module):
    """MLP trunk (Linear, activation, dropout per hidden layer) and a Linear head per task.

    Args:
        in_features: flattened input size.
        heads: task name -> output size of its head.
        hidden: widths of the trunk's layers (at least one).
        dropout: dropout after each trunk layer.
    """

    def __init__(
        self,
        in_features: int,
        heads: Mapping[str, int],
        *,
        hidden: Sequence[int] = (128, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("multihead needs at least one hidden layer for the shared trunk")
        if not heads:
            raise ValueError("multihead needs at least one task head")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


def build_multihead(
    info: DataInfo, *, hidden: Sequence[int] = (128, 128), dropout: float = 0.0
) -> MultiHead:
    """A :class:`MultiHead` with one head per task of ``info.tasks``.

    Raises:
        ValueError: the data is not multi-task.
    """
    from kiln.data.multitask import task_columns

    heads = {
        str(t["name"]): int(t["num_classes"]) if t["task"] == "classification" else 1  # type: ignore[call-overload]
        for t in task_columns(info)
    }
    return MultiHead(math.prod(info.input_shape), heads, hidden=hidden, dropout=dropout)

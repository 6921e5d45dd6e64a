"""What every data source returns: datasets for each split plus a small description of them.

Models are built from :class:`DataInfo` (input shape, number of classes, vocabulary), so a config
never repeats what the data already says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from kiln.errors import DataError

Task = Literal["classification", "regression", "lm", "multitask"]


@dataclass
class DataInfo:
    """What a model and a loss need to know about the data.

    Attributes:
        task: ``classification``, ``regression``, ``lm`` (next-token prediction) or
            ``multitask`` (several targets per example; see ``tasks``).
        input_shape: shape of one example's input, e.g. ``(64,)``, ``(1, 32, 32)``, ``(block,)``.
        num_classes: classes for classification (None otherwise).
        num_outputs: regression targets per example (1 for a single column).
        vocab_size: tokens for ``lm`` data.
        class_names: label names in class-index order, when known.
        tasks: for ``multitask`` data, one entry per target column, in column order:
            ``{"name": ..., "task": "classification" | "regression", "num_classes": C | None,
            "class_names": [...] | None}``. Targets are then a float ``[N, T]`` tensor (class
            indices stored as exact small floats), so every loader and split handles them.
        extra: source-specific facts worth keeping with a run (normalisation mean/std, the
            character vocabulary, feature names). JSON-serialisable values only.
    """

    task: Task
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    num_outputs: int = 1
    vocab_size: int | None = None
    class_names: list[str] | None = None
    tasks: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataBundle:
    """Train/val/test datasets of one source and their :class:`DataInfo`."""

    train: Dataset[Any]
    val: Dataset[Any] | None
    test: Dataset[Any] | None
    info: DataInfo


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory tensors ``x[i], y[i]`` with a batched gather.

    ``__getitems__`` returns a whole batch with one index op instead of collating sample by
    sample; Kiln's loader passes such batches straight through (see ``kiln.data.gather``), which
    removes most of a small model's per-step data cost.

    Example:
        >>> ds = ArrayDataset(torch.randn(10, 3), torch.arange(10))
        >>> xb, yb = ds.__getitems__([0, 2, 4])
        >>> xb.shape, yb.tolist()
        (torch.Size([3, 3]), [0, 2, 4])
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise DataError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]

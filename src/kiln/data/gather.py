"""Batched gather: one call per batch instead of one per sample, for any dataset that allows it.

A ``DataLoader`` over a map-style dataset indexes it once per sample and collates the samples
(``default_collate``); for in-memory tensors and a small model that is most of a step. Many
datasets can gather a whole batch at once, and for those Kiln's loader
(:class:`kiln.data.loader.ArrayLoader`) calls :func:`batch_gather`'s function once per batch:

* tensors in memory: Kiln's :class:`~kiln.data.base.ArrayDataset` and torch's ``TensorDataset``
  (one index op per tensor);
* a dataset with its own ``__getitems__`` (torch's batched-fetch protocol: a list of samples for
  a list of indices), collated with ``default_collate`` as a ``DataLoader`` would;
* any chain of ``Subset``\\s over one of these (the indices are composed once, not per batch).

The batches are exactly those of the per-sample path, in the same order: a gather of indices
``[i0, i1, ...]`` equals ``default_collate([ds[i0], ds[i1], ...])`` (a ``TensorDataset`` gives a
list of tensors, as ``default_collate`` does; an ``ArrayDataset`` its ``(x, y)`` tuple).

Example:
    >>> import torch
    >>> from torch.utils.data import Subset, TensorDataset
    >>> ds = Subset(TensorDataset(torch.arange(10.0), torch.arange(10)), [9, 8, 7, 6])
    >>> gather = batch_gather(ds)
    >>> [t.tolist() for t in gather(torch.tensor([0, 2]))]
    [[9.0, 7.0], [9, 7]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from kiln.data.base import ArrayDataset

__all__ = ["batch_gather", "columns", "gather_plan", "is_batched", "returns_batches"]

Gather = Callable[[torch.Tensor], Any]


def _unwrap(dataset: Dataset[Any]) -> tuple[Dataset[Any], torch.Tensor | None]:
    """The dataset under a chain of Subsets and the composed index into it (None: no Subset)."""
    index: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        outer = torch.as_tensor(dataset.indices, dtype=torch.long)
        index = outer if index is None else outer[index]
        dataset = dataset.dataset
    return dataset, index


def columns(dataset: Dataset[Any]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """The in-memory tensors a dataset indexes, and the composed Subset index into them.

    Returns ``((x, y), index)`` for an :class:`~kiln.data.base.ArrayDataset`, ``(tensors,
    index)`` for a ``TensorDataset`` (``index`` is None without a Subset), or None for any other
    dataset. Sample ``i`` is ``tuple(t[index[i]] for t in tensors)``; nothing is copied.
    """
    base, index = _unwrap(dataset)
    if isinstance(base, ArrayDataset):
        return (base.x, base.y), index
    if type(base) is TensorDataset:
        return tuple(base.tensors), index
    return None


def gather_plan(dataset: Dataset[Any]) -> tuple[Gather, torch.Tensor | None] | None:
    """How to gather a batch: a function of indices into the dataset under the Subsets, and the
    composed Subset index (None: no Subset), or None when the dataset cannot gather at once.

    A loader composes the index with a whole epoch's order once, then calls the function once
    per batch (:class:`kiln.data.loader.ArrayLoader`).
    """
    base, index = _unwrap(dataset)
    if isinstance(base, ArrayDataset):
        x, y = base.x, base.y
        return (lambda idx: (x[idx], y[idx])), index
    if type(base) is TensorDataset:  # a subclass may override __getitem__: take the slow path
        tensors = tuple(base.tensors)
        return (lambda idx: [t[idx] for t in tensors]), index
    many = getattr(base, "__getitems__", None)
    if callable(many):
        return (lambda idx: default_collate(many(idx.tolist()))), index
    return None


def batch_gather(dataset: Dataset[Any]) -> Gather | None:
    """A function from a tensor of indices to the collated batch, or None when not possible."""
    plan = gather_plan(dataset)
    if plan is None:
        return None
    gather, index = plan
    if index is None:
        return gather
    return lambda idx: gather(index[idx])


def is_batched(dataset: Dataset[Any]) -> bool:
    """True when Kiln's loader can gather a whole batch of ``dataset`` at once.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> is_batched(TensorDataset(torch.zeros(4, 2))), is_batched([1, 2, 3])
        (True, False)
    """
    return gather_plan(dataset) is not None


def returns_batches(dataset: Dataset[Any]) -> bool:
    """True when ``dataset.__getitems__`` returns a collated batch (an ArrayDataset under Subsets).

    A ``DataLoader`` over such a dataset must not collate again (Kiln passes its batches through).
    """
    return isinstance(_unwrap(dataset)[0], ArrayDataset)

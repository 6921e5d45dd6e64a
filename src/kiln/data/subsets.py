"""Class subsets and few-label training splits, for transfer-learning jobs on any class data.

``data.classes=[5, 6, 7, 8, 9]`` keeps the examples of those classes in every split and
renumbers them ``0..k-1`` in the order given (so a model pretrained on classes 0-4 and one
trained on 5-9 have heads of the same size, with different meanings). ``data.train_per_class=10``
keeps 10 labelled training examples per class, drawn with the run's seed (so seeds see
different labelled examples); validation and test stay whole (with ``data.split_seed`` fixed,
every seed and label budget is measured on the same examples).

Both work on sources whose datasets are Subsets of one :class:`~kiln.data.base.ArrayDataset`
(digits, tables, images); normalisation statistics stay those of the source's full train split.

Example:
    >>> from kiln.config import DataConfig
    >>> from kiln.data import build_data
    >>> b = build_data(DataConfig(classes=[5, 6, 7, 8, 9], train_per_class=10), seed=0)
    >>> b.info.num_classes, b.info.class_names[0], len(b.train)
    (5, '5', 50)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Subset

from kiln.data.base import ArrayDataset, DataBundle
from kiln.data.splits import limit_per_class
from kiln.errors import DataError

__all__ = ["few_shot", "select_classes"]


def _base(bundle: DataBundle, what: str) -> ArrayDataset:
    train = bundle.train
    if bundle.info.task != "classification" or not bundle.info.num_classes:
        raise DataError(f"data.{what} needs classification data; this data is {bundle.info.task}")
    if not (isinstance(train, Subset) and isinstance(train.dataset, ArrayDataset)):
        raise DataError(f"data.{what} is not yet supported for this data source")
    return train.dataset


def select_classes(bundle: DataBundle, classes: Sequence[int]) -> DataBundle:
    """Keep only ``classes`` (original indices), renumbered ``0..k-1`` in the given order.

    Raises:
        DataError: not classification data, a class out of range, or a repeated class.
    """
    base = _base(bundle, "classes")
    n = bundle.info.num_classes or 0
    bad = [c for c in classes if not 0 <= c < n]
    if bad or len(set(classes)) != len(classes) or len(classes) < 2:
        raise DataError(
            f"data.classes must be >= 2 distinct class indices in 0..{n - 1}, got {list(classes)}"
        )
    mapping = torch.full((n,), -1, dtype=torch.long)
    mapping[torch.as_tensor(list(classes))] = torch.arange(len(classes))
    y = mapping[base.y.long()]  # -1 for the dropped classes, which no split keeps
    data = ArrayDataset(base.x, y)
    splits: list[Subset[tuple[torch.Tensor, torch.Tensor]] | None] = []
    for split in (bundle.train, bundle.val, bundle.test):
        if split is None:
            splits.append(None)
            continue
        assert isinstance(split, Subset)
        kept = [i for i in split.indices if y[i] >= 0]
        splits.append(Subset(data, kept) if kept else None)
    info = bundle.info
    names = info.class_names or [str(i) for i in range(n)]
    info.num_classes = len(classes)
    info.class_names = [names[c] for c in classes]
    info.extra["classes"] = list(classes)
    assert splits[0] is not None
    return DataBundle(train=splits[0], val=splits[1], test=splits[2], info=info)


def few_shot(bundle: DataBundle, per_class: int, seed: int) -> DataBundle:
    """Keep ``per_class`` seeded random training examples of each class (val/test unchanged)."""
    base = _base(bundle, "train_per_class")
    train = bundle.train
    assert isinstance(train, Subset)
    indices = list(train.indices)
    labels = base.y.long().tolist()
    kept = limit_per_class(indices, labels, per_class, seed)
    bundle.info.extra["train_per_class"] = per_class
    bundle.info.extra.setdefault("splits", {})["train"] = len(kept)
    return DataBundle(train=Subset(base, kept), val=bundle.val, test=bundle.test, info=bundle.info)

"""Train/val/test splits and train-only standardisation, shared by every data source.

Why here and not in each source: the split decides which rows a model may learn from, so it must
be seeded, stratified where that is possible, and never drop an example; and normalisation
statistics must come from the train rows only, or validation scores leak information from the
held-out rows. Every source calls these few functions, so those rules hold everywhere.

Example:
    >>> train, val, test = split_indices(10, val_fraction=0.2, test_fraction=0.2, seed=0)
    >>> len(train), len(val), len(test)
    (6, 2, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from kiln.errors import DataError

__all__ = ["limit_per_class", "split_indices", "split_sizes", "standardize", "subset_splits"]


def split_sizes(
    n: int, *, val_fraction: float, test_fraction: float, what: str = "examples"
) -> tuple[int, int, int]:
    """How many of ``n`` examples go to train, val and test.

    A split whose fraction is above 0 gets at least one example, so a small dataset never ends
    up with an empty validation set that silently disables validation.

    Args:
        n: number of examples.
        val_fraction: share of ``n`` for validation, in ``[0, 1)``.
        test_fraction: share of ``n`` for the test split, in ``[0, 1)``.
        what: how to name the examples in an error ("rows in data.csv", "characters").

    Returns:
        ``(n_train, n_val, n_test)``, summing to ``n``.

    Raises:
        DataError: ``n`` is too small to give every requested split an example.

    Example:
        >>> split_sizes(1797, val_fraction=0.1, test_fraction=0.2)
        (1258, 180, 359)
    """
    if min(val_fraction, test_fraction) < 0.0 or val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction and test_fraction must be >= 0 with a sum below 1, got {val_fraction} "
            f"and {test_fraction}"
        )

    def sizes(m: int) -> tuple[int, int, int]:
        n_val = max(1, round(m * val_fraction)) if val_fraction > 0 else 0
        n_test = max(1, round(m * test_fraction)) if test_fraction > 0 else 0
        return m - n_val - n_test, n_val, n_test

    if sizes(n)[0] < 1:
        needed = max(n + 1, 1)
        while sizes(needed)[0] < 1:
            needed += 1
        raise DataError(
            f"{n} {what} cannot fill the train/val/test splits (val_fraction={val_fraction}, "
            f"test_fraction={test_fraction} need at least {needed}); add data or lower "
            "data.val_fraction / data.test_fraction (0 turns a split off)"
        )
    return sizes(n)


def _take(
    pool: list[int], k: int, labels: list[Any] | None, seed: int
) -> tuple[list[int], list[int]]:
    """Split ``pool`` into ``(rest, taken)`` with ``len(taken) == k``, stratified when possible."""
    from sklearn.model_selection import train_test_split

    if k == 0:
        return pool, []
    strat = [labels[i] for i in pool] if labels is not None else None
    try:
        rest, taken = train_test_split(pool, test_size=k, random_state=seed, stratify=strat)
    except ValueError:
        # A class with one member, or fewer held-out slots than classes: stratification is
        # impossible, so fall back to a plain seeded shuffle (still every example kept).
        if strat is None:
            raise
        rest, taken = train_test_split(pool, test_size=k, random_state=seed, stratify=None)
    return list(rest), list(taken)


def split_indices(
    n: int,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: Sequence[Any] | torch.Tensor | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Seeded, optionally stratified train/val/test indices over ``range(n)``.

    The validation split is drawn first from all examples, so its class counts are within one
    of the exact proportions; the test split is then drawn from the rest. When a class is too
    rare to stratify, the split falls back to an unstratified shuffle; no example is dropped.

    Args:
        n: number of examples.
        val_fraction: share of ``n`` for validation.
        test_fraction: share of ``n`` for the test split.
        seed: the same seed gives the same split.
        stratify: class label per example (classification), or None.

    Returns:
        ``(train_idx, val_idx, test_idx)``: sorted, disjoint python lists covering ``range(n)``.

    Example:
        >>> tr, va, te = split_indices(6, val_fraction=0.34, test_fraction=0.0, seed=1,
        ...                            stratify=[0, 0, 0, 1, 1, 1])
        >>> len(tr), len(va), te
        (4, 2, [])
    """
    _, n_val, n_test = split_sizes(n, val_fraction=val_fraction, test_fraction=test_fraction)
    labels: list[Any] | None = None
    if stratify is not None:
        labels = stratify.tolist() if isinstance(stratify, torch.Tensor) else list(stratify)
        if len(labels) != n:
            raise DataError(f"stratify has {len(labels)} labels for {n} examples")
    rest, val = _take(list(range(n)), n_val, labels, seed)
    train, test = _take(rest, n_test, labels, seed + 1)
    assert len(train) + len(val) + len(test) == n
    return sorted(train), sorted(val), sorted(test)


def subset_splits(
    dataset: Dataset[Any], train_idx: list[int], val_idx: list[int], test_idx: list[int]
) -> tuple[Subset[Any], Subset[Any] | None, Subset[Any] | None]:
    """Wrap ``dataset`` into train/val/test :class:`~torch.utils.data.Subset` objects.

    An empty val or test index list (its fraction was 0) gives ``None``. ``Subset.__getitems__``
    forwards whole batches to an :class:`~kiln.data.base.ArrayDataset`, so batching stays fast.

    Example:
        >>> from kiln.data.base import ArrayDataset
        >>> tr, va, te = subset_splits(ArrayDataset(torch.zeros(4, 1), torch.arange(4)),
        ...                            [0, 1, 2], [3], [])
        >>> len(tr), len(va), te
        (3, 1, None)
    """
    val = Subset(dataset, val_idx) if val_idx else None
    test = Subset(dataset, test_idx) if test_idx else None
    return Subset(dataset, train_idx), val, test


def standardize(
    x: torch.Tensor, train_idx: list[int], *, per_feature: bool = True
) -> tuple[torch.Tensor, list[float], list[float]]:
    """Standardise ``x`` with mean/std measured on the rows ``train_idx`` only.

    Statistics are computed in float64 and use the population std (``correction=0``), so the
    train rows come out with mean 0 and std 1 exactly; a constant column (std 0) is only
    centred, since dividing by 0 would turn it into NaNs.

    Args:
        x: ``(N, ...)`` values; row ``i`` is example ``i``.
        train_idx: rows whose statistics are used.
        per_feature: one mean/std per column of a ``(N, F)`` tensor; False: one scalar for all.

    Returns:
        ``(standardised x as float32, mean list, std list)``.

    Example:
        >>> z, mean, std = standardize(torch.tensor([[1.0], [3.0], [100.0]]), [0, 1])
        >>> z.flatten().tolist(), mean, std
        ([-1.0, 1.0, 98.0], [2.0], [1.0])
    """
    x64 = x.to(torch.float64)
    train = x64[torch.as_tensor(train_idx, dtype=torch.long)]
    if per_feature:
        mean = train.mean(dim=0)
        std = train.std(dim=0, correction=0)
    else:
        mean = train.mean().reshape(1)
        std = train.std(correction=0).reshape(1)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    out = ((x64 - mean) / std).to(torch.float32)
    return out, mean.flatten().tolist(), std.flatten().tolist()


def limit_per_class(indices: list[int], labels: list[int], k: int, seed: int) -> list[int]:
    """At most ``k`` of ``indices`` per class, chosen by a seeded shuffle; sorted.

    A class with fewer than ``k`` examples keeps all of them.

    Example:
        >>> limit_per_class([0, 1, 2, 3, 4], [0, 0, 0, 1, 1], k=1, seed=0) in ([0, 3], [0, 4],
        ...     [1, 3], [1, 4], [2, 3], [2, 4])
        True
    """
    if k < 1:
        raise DataError(f"train_per_class must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(seed)
    order = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
    kept: dict[int, list[int]] = {}
    for i in order:
        bucket = kept.setdefault(labels[i], [])
        if len(bucket) < k:
            bucket.append(i)
    return sorted(i for bucket in kept.values() for i in bucket)

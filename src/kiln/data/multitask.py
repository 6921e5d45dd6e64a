"""A multi-target data source: scikit-learn's digits with two tasks per example.

Each example has two targets: the digit (10 classes) and its parity (2 classes). A fraction
``data.parity_noise`` of the *training* parity labels is flipped (validation and test keep the
true ones), which makes the second task noisy on purpose: a multi-task loss with learned
uncertainty weights (:class:`kiln.losses.MultiTaskCriterion`) should then weight it down, and
the run's logged task weights show whether it did.

Targets are one float tensor ``[N, T]`` (one column per task, class indices stored as exact
small floats), described by :attr:`DataInfo.tasks`; every split, loader and device move handles
it like any other target tensor.

Example:
    >>> from kiln.config import DataConfig
    >>> bundle = build_digits_multitask(DataConfig(name="digits_multitask"), seed=0)
    >>> [t["name"] for t in bundle.info.tasks], bundle.train[0][1].shape
    (['digit', 'parity'], torch.Size([2]))
"""

from __future__ import annotations

import torch
from torch.utils.data import Subset

from kiln.config import DataConfig
from kiln.data.base import ArrayDataset, DataBundle, DataInfo
from kiln.data.digits import build_digits
from kiln.data.splits import subset_splits
from kiln.errors import DataError

__all__ = ["build_digits_multitask", "task_columns"]


def task_columns(info: DataInfo) -> list[dict[str, object]]:
    """``info.tasks`` checked: a non-empty list of named classification/regression tasks.

    Raises:
        DataError: the data is not multi-task, or a task entry is malformed.
    """
    if info.task != "multitask" or not info.tasks:
        raise DataError(
            f"this data is {info.task!r}, not multi-task (DataInfo.tasks is empty); use a "
            "multi-target source such as data.name=digits_multitask"
        )
    names = [t.get("name") for t in info.tasks]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"multi-task data needs distinct task names, got {names}")
    for t in info.tasks:
        if t.get("task") not in ("classification", "regression"):
            raise DataError(
                f"task {t['name']!r}: kind must be classification or regression, got "
                f"{t.get('task')!r}"
            )
        if t["task"] == "classification" and not t.get("num_classes"):
            raise DataError(f"classification task {t['name']!r} must say num_classes")
    return list(info.tasks)


def build_digits_multitask(cfg: DataConfig, *, seed: int, layout: str = "flat") -> DataBundle:
    """Digits with targets ``[digit, parity]``; ``cfg.parity_noise`` of train parities flipped.

    Args:
        cfg: data settings, as for :func:`kiln.data.digits.build_digits`, plus
            ``parity_noise`` (fraction of training parity labels flipped, seeded).
        seed: seeds the split (the same split as plain digits with this seed) and the flips.
        layout: ``flat`` or ``image``.

    Returns:
        A :class:`DataBundle` with ``info.task == "multitask"`` and float targets ``[N, 2]``.
    """
    base_bundle = build_digits(cfg, seed=seed, layout=layout)
    splits = [base_bundle.train, base_bundle.val, base_bundle.test]
    assert isinstance(base_bundle.train, Subset)
    base = base_bundle.train.dataset  # the ArrayDataset under the three Subsets
    assert isinstance(base, ArrayDataset)
    digit = base.y
    parity = digit % 2
    train_idx = torch.as_tensor(base_bundle.train.indices, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the split is unchanged
    flip = train_idx[torch.rand(len(train_idx), generator=gen) < cfg.parity_noise]
    parity = parity.clone()
    parity[flip] = 1 - parity[flip]
    targets = torch.stack([digit, parity], dim=1).to(torch.float32)
    val_idx, test_idx = (list(s.indices) if isinstance(s, Subset) else [] for s in splits[1:])
    train, val, test = subset_splits(
        ArrayDataset(base.x, targets), list(base_bundle.train.indices), val_idx, test_idx
    )
    info = base_bundle.info
    info.extra["source"] = "digits_multitask"
    info.extra["parity_noise"] = cfg.parity_noise
    info.extra["parity_flipped"] = len(flip)
    multi = DataInfo(
        task="multitask",
        input_shape=info.input_shape,
        tasks=[
            {
                "name": "digit",
                "task": "classification",
                "num_classes": 10,
                "class_names": [str(i) for i in range(10)],
            },
            {
                "name": "parity",
                "task": "classification",
                "num_classes": 2,
                "class_names": ["even", "odd"],
            },
        ],
        extra=info.extra,
    )
    return DataBundle(train=train, val=val, test=test, info=multi)

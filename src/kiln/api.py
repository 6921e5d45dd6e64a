"""``kiln.fit``: train a user's own model and data from Python with Kiln's loop.

Example:
    >>> import torch, kiln
    >>> from torch.utils.data import TensorDataset
    >>> ds = TensorDataset(torch.randn(200, 8), torch.randint(0, 3, (200,)))
    >>> result = kiln.fit(model=torch.nn.Linear(8, 3), data=ds,
    ...                   config={"train": {"epochs": 1}}, verbose=False)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from kiln.config import Config, apply_overrides, load_config, validate
from kiln.data.base import DataBundle, DataInfo


def _as_config(config: Config | str | Path | dict[str, Any] | None, overrides: list[str]) -> Config:
    if isinstance(config, Config):
        return validate(apply_overrides(config.model_dump(mode="json"), overrides))
    if isinstance(config, dict):
        return validate(apply_overrides(config, overrides))
    return load_config(config, overrides)


def infer_info(dataset: Dataset[Any], task: str | None = None) -> DataInfo:
    """Describe a user's dataset from its examples: input shape, task, number of classes."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the dataset is empty")
    x, y = dataset[0]
    y = torch.as_tensor(y)
    ys = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(n)])
    if task is None:
        task = "classification" if not y.is_floating_point() and y.dim() == 0 else "regression"
    if task == "classification":
        return DataInfo("classification", tuple(x.shape), num_classes=int(ys.max()) + 1)
    if task != "regression":
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    return DataInfo("regression", tuple(x.shape), num_outputs=max(1, y.numel()))


def _as_bundle(data: Any, cfg: Config, task: str | None) -> DataBundle:
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, (tuple, list)):
        parts = list(data) + [None] * (3 - len(data))
        train, val, test = parts[:3]
        return DataBundle(train, val, test, infer_info(train, task))
    from kiln.data.splits import split_indices

    info = infer_info(data, task)
    labels = None
    if info.task == "classification":
        labels = [int(data[i][1]) for i in range(len(data))]
    tr, va, te = split_indices(
        len(data),
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        stratify=labels,
    )
    return DataBundle(
        Subset(data, tr), Subset(data, va) if va else None, Subset(data, te) if te else None, info
    )


def fit(
    *,
    model: nn.Module | None = None,
    data: DataBundle | Dataset[Any] | Sequence[Dataset[Any]] | None = None,
    config: Config | str | Path | dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    task: str | None = None,
    callbacks: Sequence[object] = (),
    verbose: bool = True,
) -> Any:
    """Train ``model`` on ``data`` with Kiln's Trainer and return a :class:`FitResult`.

    Args:
        model: your ``nn.Module`` (default: built from ``config.model``).
        data: a Dataset (split into train/val/test by the config's fractions, stratified for
            classification), a ``(train, val[, test])`` tuple, or a DataBundle (default: built from
            ``config.data``).
        config: a Config, a YAML path, a nested dict, or None for defaults.
        overrides: ``key.sub=value`` strings applied on top.
        task: ``classification`` or ``regression`` when it cannot be inferred from the targets.
        callbacks: objects with ``on_<event>`` methods.
        verbose: print one line per epoch.
    """
    from kiln.train.trainer import Trainer

    cfg = _as_config(config, list(overrides))
    bundle = _as_bundle(data, cfg, task) if data is not None else None
    return Trainer(cfg, model=model, data=bundle, callbacks=callbacks, verbose=verbose).fit()

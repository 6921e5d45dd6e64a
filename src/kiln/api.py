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
from kiln.data.base import ArrayDataset, DataBundle, DataInfo
from kiln.data.gather import columns


def _as_config(config: Config | str | Path | dict[str, Any] | None, overrides: list[str]) -> Config:
    if isinstance(config, Config):
        return validate(apply_overrides(config.model_dump(mode="json"), overrides))
    if isinstance(config, dict):
        return validate(apply_overrides(config, overrides))
    return load_config(config, overrides)


def _targets(dataset: Dataset[Any]) -> tuple[tuple[int, ...], torch.Tensor]:
    """The shape of one input and every target, reading each sample once (in memory: none).

    Tensors in memory (``TensorDataset``, ``ArrayDataset``, Subsets of them) are read as columns
    without indexing a single sample; any other dataset is read in one pass.
    """
    cols = columns(dataset)
    if cols is not None and len(cols[0]) == 2:
        (x, y), index = cols
        return tuple(x.shape[1:]), y if index is None else y[index]
    n = len(dataset)  # type: ignore[arg-type]
    shape: tuple[int, ...] = ()
    ys = []
    for i in range(n):
        x, y = dataset[i]
        if i == 0:
            shape = tuple(x.shape)
        ys.append(torch.as_tensor(y))
    return shape, torch.stack(ys)


def infer_info(dataset: Dataset[Any], task: str | None = None) -> DataInfo:
    """Describe a user's dataset from its examples: input shape, task, number of classes.

    Each sample is read at most once; tensors in memory are not indexed sample by sample.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(6, 3), torch.tensor([0, 2, 1, 0, 2, 1]))
        >>> info = infer_info(ds)
        >>> info.task, info.input_shape, info.num_classes
        ('classification', (3,), 3)
    """
    return _describe(dataset, task)[0]


def _describe(dataset: Dataset[Any], task: str | None) -> tuple[DataInfo, torch.Tensor]:
    """The DataInfo of ``dataset`` and all of its targets (for a stratified split)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the dataset is empty")
    shape, ys = _targets(dataset)
    y = ys[0]
    if task is None:
        task = "classification" if not y.is_floating_point() and y.dim() == 0 else "regression"
    if task == "classification":
        return DataInfo("classification", shape, num_classes=int(ys.max()) + 1), ys
    if task != "regression":
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    return DataInfo("regression", shape, num_outputs=max(1, y.numel())), ys


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__module__ == "numpy"


def _as_dataset(x: Any, y: Any) -> ArrayDataset:
    """Inputs and targets given as tensors or numpy arrays: an in-memory dataset.

    Floating inputs become the default float dtype (numpy's float64 would not match a model's
    float32 weights); targets keep their dtype.
    """
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    if xt.is_floating_point():
        xt = xt.to(torch.get_default_dtype())
    return ArrayDataset(xt, yt)


def _as_bundle(data: Any, cfg: Config, task: str | None) -> DataBundle:
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(map(_is_array, data)):
        data = _as_dataset(*data)  # (inputs, targets), not (train, val)
    if isinstance(data, (tuple, list)):
        parts = list(data) + [None] * (3 - len(data))
        train, val, test = parts[:3]
        return DataBundle(train, val, test, infer_info(train, task))
    from kiln.data.splits import split_indices

    info, targets = _describe(data, task)
    tr, va, te = split_indices(
        len(data),
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        stratify=targets if info.task == "classification" else None,
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
            classification), an ``(inputs, targets)`` pair of tensors or numpy arrays (split
            the same way), a ``(train, val[, test])`` tuple of Datasets, or a DataBundle
            (default: built from ``config.data``). In-memory tensors (``TensorDataset``, pairs)
            and datasets with ``__getitems__`` are loaded a whole batch at a time.
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

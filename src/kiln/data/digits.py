"""The default dataset: scikit-learn's 8x8 handwritten digits, as flat vectors or small images.

Why digits: it ships inside scikit-learn (no download), has 1797 examples in 10 classes, trains
in seconds on a CPU and is still hard enough for the difference between an MLP and a CNN, or
between two training techniques, to show. The same data serves both model families: ``flat``
gives 64 standardised pixels for an MLP, ``image`` gives a ``1 x S x S`` upsampled picture for a
CNN. Normalisation statistics come from the train split only.

Example:
    >>> from kiln.config import DataConfig
    >>> bundle = build_digits(DataConfig(), seed=0, layout="image")
    >>> bundle.info.input_shape, bundle.info.num_classes
    ((1, 32, 32), 10)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.config import DataConfig
from kiln.data.base import ArrayDataset, DataBundle, DataInfo
from kiln.data.splits import split_indices, standardize, subset_splits
from kiln.errors import DataError

__all__ = ["build_digits"]


def build_digits(cfg: DataConfig, *, seed: int, layout: str = "flat") -> DataBundle:
    """Load scikit-learn's digits, split them and normalise with train-split statistics.

    Args:
        cfg: data settings; uses ``val_fraction``, ``test_fraction``, ``image_size``,
            ``standardize`` and ``task`` (must be ``auto`` or ``classification``).
        seed: seeds the stratified split.
        layout: ``flat`` -> ``(N, 64)`` pixels scaled to [0, 1] then standardised per pixel;
            ``image`` -> ``(N, 1, S, S)`` with ``S = cfg.image_size``, bilinearly upsampled from
            8x8 and standardised with one scalar mean/std.

    Returns:
        A :class:`DataBundle` of :class:`ArrayDataset` subsets; inputs float32, targets int64.

    Raises:
        DataError: an unknown layout, or ``task=regression``.
    """
    from sklearn.datasets import load_digits

    if layout not in ("flat", "image"):
        raise DataError(f"digits layout must be 'flat' or 'image', got {layout!r}")
    if cfg.task == "regression":
        raise DataError("digits is a classification dataset; set data.task=auto")
    raw = load_digits()
    pixels = torch.as_tensor(raw.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    train_idx, val_idx, test_idx = split_indices(
        len(y),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
        stratify=y,
    )

    if layout == "flat":
        x = pixels.reshape(len(y), 64)
        input_shape: tuple[int, ...] = (64,)
        per_feature = True
    else:
        size = cfg.image_size
        # Upsample before normalising: bilinear interpolation of the [0, 1] values keeps the
        # range, and the statistics then describe exactly what the model sees.
        x = F.interpolate(
            pixels.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False
        )
        input_shape = (1, size, size)
        per_feature = False

    extra: dict[str, object] = {
        "source": "digits",
        "layout": layout,
        "splits": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
    }
    if layout == "flat":
        extra["feature_names"] = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    if cfg.standardize:
        x, mean, std = standardize(x, train_idx, per_feature=per_feature)
        extra["mean"], extra["std"] = mean, std
    x = x.contiguous()

    train, val, test = subset_splits(ArrayDataset(x, y), train_idx, val_idx, test_idx)
    info = DataInfo(
        task="classification",
        input_shape=input_shape,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        extra=extra,
    )
    return DataBundle(train=train, val=val, test=test, info=info)

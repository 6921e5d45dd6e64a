"""Digits: flat and image layouts, train-only normalisation, stratified splits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from kiln.config import DataConfig
from kiln.data import build_data, is_batched
from kiln.data.base import DataBundle


def _all(bundle: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    base = bundle.train.dataset  # type: ignore[attr-defined]
    return base.x, base.y


def test_flat_shapes_dtypes_and_info() -> None:
    bundle = build_data(DataConfig(), seed=0)
    info = bundle.info
    assert info.task == "classification" and info.input_shape == (64,)
    assert info.num_classes == 10 and info.class_names == [str(i) for i in range(10)]
    x, y = bundle.train[0]
    assert x.shape == (64,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert bundle.val is not None and bundle.test is not None
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert is_batched(bundle.train)
    json.dumps(info.extra)  # JSON-serialisable
    assert len(info.extra["feature_names"]) == 64


def test_flat_standardised_with_train_statistics_only() -> None:
    bundle = build_data(DataConfig(), seed=0)
    x, _ = _all(bundle)
    train_idx = bundle.train.indices  # type: ignore[attr-defined]
    raw = torch.as_tensor(load_digits().data, dtype=torch.float64) / 16.0
    ref_mean = raw[train_idx].mean(0)
    torch.testing.assert_close(torch.tensor(bundle.info.extra["mean"]).double(), ref_mean)
    xt = x[train_idx].double()
    varying = raw[train_idx].std(0) > 0
    torch.testing.assert_close(xt.mean(0), torch.zeros(64).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        xt.std(0, correction=0)[varying], torch.ones(int(varying.sum())).double(), atol=1e-5, rtol=0
    )
    # The statistics are not those of all rows (val/test rows did not take part).
    assert not torch.allclose(ref_mean, raw.mean(0))


@pytest.mark.parametrize("size", [32, 16])
def test_image_layout_matches_reference(size: int) -> None:
    bundle = build_data(DataConfig(image_size=size), seed=1, layout="image")
    assert bundle.info.input_shape == (1, size, size)
    x, y = _all(bundle)
    assert x.shape == (1797, 1, size, size) and x.dtype == torch.float32
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    up = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
    train_idx = bundle.train.indices  # type: ignore[attr-defined]
    mean = up[train_idx].double().mean()
    std = up[train_idx].double().std(correction=0)
    ref = ((up.double() - mean) / std).float()
    torch.testing.assert_close(x, ref)
    assert y.tolist() == load_digits().target.tolist()


def test_explicit_cfg_layout_wins_over_caller() -> None:
    bundle = build_data(DataConfig(layout="image", image_size=8), seed=0, layout="flat")
    assert bundle.info.input_shape == (1, 8, 8)
    assert build_data(DataConfig(layout="flat"), seed=0, layout="image").info.input_shape == (64,)


def test_val_split_is_stratified() -> None:
    bundle = build_data(DataConfig(), seed=2)
    _, y = _all(bundle)
    assert bundle.val is not None
    val_y = y[bundle.val.indices]  # type: ignore[attr-defined]
    counts = torch.bincount(y, minlength=10)
    expected = counts.double() * len(val_y) / len(y)
    got = torch.bincount(val_y, minlength=10).double()
    assert (got - expected).abs().max() <= 1


def test_standardize_off_keeps_scaled_pixels() -> None:
    bundle = build_data(DataConfig(standardize=False), seed=0)
    x, _ = _all(bundle)
    assert x.min() == 0.0 and x.max() == 1.0
    assert "mean" not in bundle.info.extra


def test_regression_task_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data\.task=auto"):
        build_data(DataConfig(task="regression"), seed=0)

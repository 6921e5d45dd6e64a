"""scikit-learn bundled tables: task detection, shapes, train-only standardisation, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_wine

from kiln.config import DataConfig
from kiln.data import build_data, is_batched, sklearn_tables


def test_wine_is_three_class_classification() -> None:
    bundle = build_data(DataConfig(name="sklearn:wine"), seed=0)
    info = bundle.info
    assert info.task == "classification" and info.num_classes == 3
    assert info.input_shape == (13,)
    assert info.class_names == ["class_0", "class_1", "class_2"]
    assert info.extra["feature_names"][0] == "alcohol"
    x, y = bundle.train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == ()
    assert is_batched(bundle.train)
    json.dumps(info.extra)


def test_wine_features_standardised_on_train_rows() -> None:
    bundle = build_data(DataConfig(name="sklearn:wine"), seed=4)
    base = bundle.train.dataset  # type: ignore[attr-defined]
    idx = bundle.train.indices  # type: ignore[attr-defined]
    xt = base.x[idx].double()
    torch.testing.assert_close(xt.mean(0), torch.zeros(13).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(xt.std(0, correction=0), torch.ones(13).double(), atol=1e-5, rtol=0)
    raw = load_wine().data
    np.testing.assert_allclose(bundle.info.extra["mean"], raw[idx].mean(0), rtol=1e-12)
    assert base.y.tolist() == load_wine().target.tolist()


def test_standardize_off_keeps_raw_features() -> None:
    bundle = build_data(DataConfig(name="sklearn:wine", standardize=False), seed=0)
    base = bundle.train.dataset  # type: ignore[attr-defined]
    np.testing.assert_allclose(base.x.numpy(), load_wine().data, rtol=1e-6)


def test_diabetes_is_regression_with_raw_targets() -> None:
    bundle = build_data(DataConfig(name="sklearn:diabetes"), seed=0)
    info = bundle.info
    assert info.task == "regression" and info.num_classes is None and info.num_outputs == 1
    base = bundle.train.dataset  # type: ignore[attr-defined]
    assert base.y.shape == (442, 1) and base.y.dtype == torch.float32
    target = load_diabetes().target
    np.testing.assert_allclose(base.y[:, 0].numpy(), target, rtol=1e-6)
    idx = bundle.train.indices  # type: ignore[attr-defined]
    assert info.extra["target_mean"] == pytest.approx([target[idx].mean()])
    assert info.extra["target_std"] == pytest.approx([target[idx].std()])


def test_linnerud_has_three_outputs() -> None:
    info = build_data(DataConfig(name="sklearn:linnerud", val_fraction=0.1), seed=0).info
    assert info.task == "regression" and info.num_outputs == 3


def test_task_override() -> None:
    bundle = build_data(DataConfig(name="sklearn:wine", task="regression"), seed=0)
    assert bundle.info.task == "regression"
    assert bundle.train[0][1].dtype == torch.float32
    # Integer-valued targets may be declared classes explicitly (diabetes: 214 distinct values).
    info = build_data(DataConfig(name="sklearn:diabetes", task="classification"), seed=0).info
    assert info.num_classes == len(np.unique(load_diabetes().target))
    assert info.class_names is not None and info.class_names[0] == "25"
    with pytest.raises(ValueError, match=r"3 target columns.*data\.task=auto or regression"):
        build_data(DataConfig(name="sklearn:linnerud", task="classification"), seed=0)


def test_unknown_name_lists_available_and_suggests() -> None:
    with pytest.raises(ValueError, match=r"unknown scikit-learn dataset 'breast_cancr'") as exc:
        build_data(DataConfig(name="sklearn:breast_cancr"), seed=0)
    assert "did you mean 'breast_cancer'?" in str(exc.value)
    assert "iris" in str(exc.value) and "wine" in str(exc.value)


def test_available_tables_exclude_non_tables() -> None:
    names = sklearn_tables()
    assert {"iris", "wine", "breast_cancer", "diabetes", "digits"} <= set(names)
    assert "files" not in names and "sample_image" not in names

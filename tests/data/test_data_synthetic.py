"""Synthetic data: honours cfg.synthetic, is seeded, and standardised on train rows."""

from __future__ import annotations

import pytest
import torch

from kiln.config import DataConfig, SyntheticConfig
from kiln.data import build_data, is_batched


def _cfg(**kw: object) -> DataConfig:
    settings: dict[str, object] = {"n_samples": 60, "n_features": 5, "n_informative": 3, **kw}
    syn = SyntheticConfig(**settings)  # type: ignore[arg-type]
    return DataConfig(name="synthetic", synthetic=syn)


def _xy(seed: int, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    base = build_data(cfg, seed=seed).train.dataset  # type: ignore[attr-defined]
    return base.x, base.y


def test_classification_shapes_and_classes() -> None:
    bundle = build_data(_cfg(n_classes=3), seed=0)
    info = bundle.info
    assert info.task == "classification" and info.num_classes == 3
    assert info.input_shape == (5,) and info.class_names == ["0", "1", "2"]
    assert is_batched(bundle.train)
    x, y = _xy(0, _cfg(n_classes=3))
    assert x.shape == (60, 5) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == {0, 1, 2}
    idx = bundle.train.indices  # type: ignore[attr-defined]
    torch.testing.assert_close(x[idx].double().mean(0), torch.zeros(5).double(), atol=1e-5, rtol=0)


def test_seeded() -> None:
    a, b, c = _xy(0, _cfg()), _xy(0, _cfg()), _xy(1, _cfg())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_regression_targets() -> None:
    bundle = build_data(_cfg(task="regression"), seed=0)
    assert bundle.info.task == "regression" and bundle.info.num_classes is None
    _, y = _xy(0, _cfg(task="regression"))
    assert y.shape == (60, 1) and y.dtype == torch.float32
    # cfg.task overrides the generator's task.
    over = DataConfig(name="synthetic", task="regression", synthetic=_cfg().synthetic)
    assert build_data(over, seed=0).info.task == "regression"


def test_bad_settings_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="n_informative=8 exceeds n_features=5"):
        build_data(_cfg(n_informative=8), seed=0)
    with pytest.raises(ValueError, match="needs at least 3 informative features"):
        build_data(_cfg(n_informative=2, n_classes=5), seed=0)
    with pytest.raises(ValueError, match="label-flip fraction"):
        build_data(_cfg(noise=1.5), seed=0)

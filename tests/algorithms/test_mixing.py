"""Mixup, CutMix and label smoothing against their reference formulas."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kiln.algorithms.mixing import (
    cutmix_batch,
    mixup_batch,
    sample_beta,
    smooth_soft,
    smooth_targets,
    soft_cross_entropy,
)

C = 5


def _batch(n: int = 8, shape: tuple[int, ...] = (3, 12, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fn", [mixup_batch, cutmix_batch])
def test_reproducible_from_generator_and_global_rng_untouched(fn) -> None:
    x, y = _batch()
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state(legacy=False)["state"]
    a = fn(x, y, alpha=0.4, num_classes=C, generator=_gen(7))
    b = fn(x, y, alpha=0.4, num_classes=C, generator=_gen(7))
    c = fn(x, y, alpha=0.4, num_classes=C, generator=_gen(8))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    np_after = np.random.get_state(legacy=False)["state"]
    assert np.array_equal(np_after["key"], np_state["key"]) and np_after["pos"] == np_state["pos"]
    assert_close(a.inputs, b.inputs, rtol=0, atol=0)
    assert_close(a.targets, b.targets, rtol=0, atol=0)
    assert a.lam == b.lam and torch.equal(a.perm, b.perm) and a.box == b.box
    assert a.lam != c.lam


def test_mixup_matches_formula_and_targets() -> None:
    x, y = _batch()
    out = mixup_batch(x, y, alpha=0.4, num_classes=C, generator=_gen())
    lam, perm = out.lam, out.perm
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(len(x)))
    assert out.box is None
    assert_close(out.inputs, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(y, C).float()
    assert_close(out.targets, lam * onehot + (1 - lam) * onehot[perm])
    assert_close(out.targets.sum(1), torch.ones(len(x)))


def test_cutmix_pastes_the_box_and_lam_is_exact() -> None:
    x, y = _batch()
    h, w = x.shape[-2:]
    seen_partial = False
    for seed in range(20):
        out = cutmix_batch(x, y, alpha=1.0, num_classes=C, generator=_gen(seed))
        assert out.box is not None
        y0, y1, x0, x1 = out.box
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        seen_partial |= 0 < int(mask.sum()) < h * w
        assert torch.equal(out.inputs[..., mask], x[out.perm][..., mask])
        assert torch.equal(out.inputs[..., ~mask], x[..., ~mask])
        assert out.lam == 1 - (y1 - y0) * (x1 - x0) / (h * w)
        onehot = F.one_hot(y, C).float()
        assert_close(out.targets, out.lam * onehot + (1 - out.lam) * onehot[out.perm])
        assert_close(out.targets.sum(1), torch.ones(len(x)))
    assert seen_partial


def test_label_smoothing_equals_torch() -> None:
    g = _gen(3)
    logits, y = torch.randn(16, C, generator=g), torch.randint(0, C, (16,), generator=g)
    for s in (0.0, 0.1, 0.35):
        soft = smooth_targets(y, C, s)
        assert_close(soft.sum(1), torch.ones(16))
        for red in ("mean", "sum", "none"):
            expected = F.cross_entropy(logits, y, label_smoothing=s, reduction=red)
            assert_close(soft_cross_entropy(logits, soft, reduction=red), expected)


def test_smooth_soft_on_mixed_targets() -> None:
    x, y = _batch()
    out = mixup_batch(x, y, alpha=0.4, num_classes=C, generator=_gen())
    smoothed = smooth_soft(out.targets, 0.1)
    assert_close(smoothed, 0.9 * out.targets + 0.1 / C)
    assert_close(smoothed.sum(1), torch.ones(len(x)))
    assert_close(smooth_soft(F.one_hot(y, C).float(), 0.2), smooth_targets(y, C, 0.2))


def test_loss_with_lam_one_is_plain_cross_entropy() -> None:
    g = _gen(4)
    logits, y = torch.randn(8, C, generator=g), torch.randint(0, C, (8,), generator=g)
    perm = torch.randperm(8, generator=g)
    onehot = F.one_hot(y, C).float()
    soft = 1.0 * onehot + 0.0 * onehot[perm]
    assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, y))


def test_beta_moments() -> None:
    alpha, n = 0.4, 2000
    g = _gen(11)
    draws = torch.tensor([sample_beta(alpha, g) for _ in range(n)], dtype=torch.float64)
    assert float(draws.min()) >= 0.0 and float(draws.max()) <= 1.0
    var = alpha**2 / ((2 * alpha) ** 2 * (2 * alpha + 1))  # = 1 / (4 (2 alpha + 1)) ~ 0.139
    # std error of the mean ~ sqrt(var / n) ~ 0.0083; of the variance ~ 0.002: 5 sigma bands.
    assert abs(float(draws.mean()) - 0.5) < 0.04
    assert abs(float(draws.var()) - var) < 0.012


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, y: mixup_batch(x, y, alpha=0.0, num_classes=C, generator=_gen()), "alpha"),
        (lambda x, y: mixup_batch(x, y, alpha=-1, num_classes=C, generator=_gen()), "alpha"),
        (lambda x, y: sample_beta(float("nan"), _gen()), "alpha"),
        (lambda x, y: cutmix_batch(x[:, 0], y, alpha=1, num_classes=C, generator=_gen()), "4-D"),
        (lambda x, y: mixup_batch(x, y + C, alpha=1, num_classes=C, generator=_gen()), r"\[0, 5\)"),
        (lambda x, y: mixup_batch(x, y - C, alpha=1, num_classes=C, generator=_gen()), r"\[0, 5\)"),
        (lambda x, y: mixup_batch(x, y.float(), alpha=1, num_classes=C, generator=_gen()), "int"),
        (lambda x, y: mixup_batch(x[:3], y, alpha=1, num_classes=C, generator=_gen()), "batch"),
        (lambda x, y: mixup_batch(x.long(), y, alpha=1, num_classes=C, generator=_gen()), "float"),
        (lambda x, y: smooth_targets(y, C, 1.0), r"\[0, 1\)"),
        (lambda x, y: smooth_targets(y, C, -0.1), r"\[0, 1\)"),
        (lambda x, y: smooth_soft(torch.ones(2, C), 1.5), r"\[0, 1\)"),
        (lambda x, y: soft_cross_entropy(torch.zeros(2, C), torch.zeros(2, C), "avg"), "mean"),
        (lambda x, y: soft_cross_entropy(torch.zeros(2, C), torch.zeros(2, 3)), "shape"),
    ],
)
def test_bad_input_raises_clear_error(call, match: str) -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match=match):
        call(x, y)

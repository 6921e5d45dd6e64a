"""Test-time augmentation: exact views, log-mean-probability output, invariances, seeded noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kiln.algorithms.tta import TTA, check_transforms, parse_transforms, tta_views
from kiln.train.engine import Engine
from kiln.train.metrics import TaskMetrics
from kiln.train.trainer import evaluate


def _conv_net(seed: int = 0) -> nn.Module:
    """Not flip-invariant: the flattened feature map keeps left and right apart."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5)
    ).eval()


def _pooled_net(seed: int = 0) -> nn.Module:
    """Flip-invariant: global average pooling forgets where a feature was."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 5)).eval()


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_parse_transforms() -> None:
    assert parse_transforms("flip, shift,flip") == ("flip", "shift")
    assert parse_transforms(["noise"]) == ("noise",)
    assert parse_transforms(None) == parse_transforms("none") == ()
    with pytest.raises(ValueError, match=r"unknown TTA transform 'rotate'; allowed: flip, vflip"):
        parse_transforms("flip,rotate")


def test_views_are_exact_flips_and_edge_padded_shifts() -> None:
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = tta_views(x, ["flip", "vflip", "shift"], shift=1)
    assert len(views) == 1 + 1 + 1 + 4
    assert views[0] is x
    torch.testing.assert_close(views[1], torch.tensor([[[[2.0, 1, 0], [5, 4, 3], [8, 7, 6]]]]))
    torch.testing.assert_close(views[2], torch.tensor([[[[6.0, 7, 8], [3, 4, 5], [0, 1, 2]]]]))
    # right, left, down, up by one pixel; the edge column/row is repeated into the gap
    expected = [
        [[0.0, 0, 1], [3, 3, 4], [6, 6, 7]],
        [[1.0, 2, 2], [4, 5, 5], [7, 8, 8]],
        [[0.0, 1, 2], [0, 1, 2], [3, 4, 5]],
        [[3.0, 4, 5], [6, 7, 8], [6, 7, 8]],
    ]
    for view, want in zip(views[3:], expected, strict=True):
        torch.testing.assert_close(view, torch.tensor([[want]]))


def test_output_is_log_of_mean_probability_over_views() -> None:
    net, x = _conv_net(), _images()
    out = TTA(net, ("flip", "shift"), shift=1)(x)
    assert out.shape == (6, 5)
    views = [x, x.flip(-1), *tta_views(x, ["shift"], shift=1)[1:]]
    with torch.no_grad():
        mean_p = torch.stack([net(v).softmax(-1) for v in views]).mean(0)
    torch.testing.assert_close(out, mean_p.log())
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(6))


def test_regression_averages_outputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    x = _images()
    out = TTA(net, "flip", task="regression")(x)
    with torch.no_grad():
        torch.testing.assert_close(out, (net(x) + net(x.flip(-1))) / 2)


def test_identity_tta_equals_plain_eval_exactly() -> None:
    net, x = _conv_net(), _images(40)
    y = torch.arange(40) % 5
    with torch.no_grad():
        assert torch.equal(TTA(net, ())(x), net(x))
    engine = Engine(device="cpu")
    metrics = TaskMetrics("classification", num_classes=5, device=torch.device("cpu"), top_k=2)
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    loss = nn.functional.cross_entropy
    plain = evaluate(net, loader, loss, engine, metrics)
    identity = evaluate(TTA(net, "none"), loader, loss, engine, metrics)
    assert identity == plain


def test_flip_tta_of_a_flip_invariant_model_equals_plain() -> None:
    x = _images()
    invariant = _pooled_net()
    with torch.no_grad():
        torch.testing.assert_close(TTA(invariant, "flip")(x), invariant(x).log_softmax(-1))
        # the same check fails for a model that does see left from right
        variant = _conv_net()
        diff = (TTA(variant, "flip")(x) - variant(x).log_softmax(-1)).abs().max()
    assert diff > 1e-3


def test_noise_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    before = torch.get_rng_state()
    a = TTA(net, "noise", seed=3)(x)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, TTA(net, "noise", seed=3)(x))
    assert torch.equal(a, TTA(net, "noise", seed=3)(x.clone()))  # same call, same answer
    assert not torch.allclose(a, TTA(net, "noise", seed=4)(x))


def test_noise_views_have_the_asked_scale() -> None:
    x = torch.zeros(2000, 8)
    gen = torch.Generator().manual_seed(0)
    views = tta_views(x, ["noise"], noise_std=0.3, noise_views=3, generator=gen)
    assert len(views) == 4
    for v in views[1:]:
        assert math.isclose(float(v.std()), 0.3, rel_tol=0.03)
    assert not torch.equal(views[1], views[2])
    with pytest.raises(ValueError, match=r"needs a torch\.Generator"):
        tta_views(x, ["noise"])


def test_transforms_must_suit_the_input() -> None:
    torch.manual_seed(0)
    table_model = nn.Linear(4, 3)
    for name in ("flip", "vflip", "shift"):
        with pytest.raises(ValueError, match=rf"TTA {name} needs image inputs .* shape \(4,\)"):
            TTA(table_model, name)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="noise suits tables"):
        check_transforms(["shift"], (64,))
    with pytest.raises(ValueError, match="not token ids"):
        check_transforms(["noise"], (16,), floating=False)
    with pytest.raises(ValueError, match="between 1 and 7 pixels"):
        TTA(_conv_net(), "shift", shift=8)(_images())
    with pytest.raises(ValueError, match="task must be one of"):
        TTA(table_model, "noise", task="segmentation")
    check_transforms(["flip", "shift", "noise"], (1, 8, 8))  # images take them all

"""Per-layer statistics against hand-computed values: zeros, dead units, NaN counts, gradients."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kiln.inspect.hooks import hook_count
from kiln.inspect.stats import json_safe, layer_stats, tensor_stats


def test_tensor_stats_match_the_formulas() -> None:
    t = torch.tensor([[0.0, 2.0, 0.0], [0.0, 4.0, 1.0]])
    s = tensor_stats(t, bins=4)
    assert s.shape == (2, 3) and s.numel == 6
    assert s.mean == pytest.approx(7 / 6)
    assert s.std == pytest.approx(float(t.std(correction=0)))
    assert (s.min, s.max) == (0.0, 4.0)
    assert s.zero_fraction == pytest.approx(3 / 6)
    assert s.dead_fraction == pytest.approx(1 / 3)  # column 0 is zero for both examples
    assert s.hist_counts == (3, 1, 1, 1) and s.hist_edges == (0.0, 1.0, 2.0, 3.0, 4.0)


def test_nonfinite_values_are_counted_and_left_out_of_the_moments() -> None:
    s = tensor_stats(torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]]))
    assert s.nonfinite == 2
    assert (s.mean, s.min, s.max) == (2.0, 1.0, 3.0)
    assert sum(s.hist_counts) == 2
    empty = tensor_stats(torch.full((2, 2), float("nan")))
    assert empty.nonfinite == 4 and empty.hist_counts == ()
    assert json.dumps(json_safe({"s": empty.mean})) == '{"s": null}'


def test_dead_relu_units_are_found() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].bias[:2] = -100.0  # units 0 and 1 never fire
    y = torch.randint(0, 2, (32,))
    report = layer_stats(net, torch.randn(32, 3), lambda out: nn.functional.cross_entropy(out, y))
    relu = report.layer("1").activation
    assert relu is not None and relu.dead_fraction == pytest.approx(0.5)
    assert report.layer("0").activation.dead_fraction == 0.0  # type: ignore[union-attr]
    assert report.loss is not None and report.loss > 0
    assert hook_count(net) == 0


def test_gradient_stats_are_of_the_loss_gradient_at_each_output() -> None:
    net = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    report = layer_stats(net, x, lambda out: out.sum() * 3)
    g = report.layer("0").gradient
    assert g is not None and (g.mean, g.std, g.shape) == (3.0, 0.0, (4, 2))
    assert net[0].weight.grad is not None  # a real backward ran
    assert layer_stats(net, x).layer("0").gradient is None  # no loss: forward only


def test_a_module_called_twice_reports_its_last_call() -> None:
    act = nn.Tanh()
    net = nn.Sequential(nn.Linear(2, 2), act, nn.Linear(2, 3), act)
    report = layer_stats(net, torch.randn(5, 2), names=["1"])
    assert report.layer("1").calls == 2
    assert report.layer("1").activation.shape == (5, 3)  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="layers: 1"):
        report.layer("0")

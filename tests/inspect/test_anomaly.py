"""NaN/Inf hunting: the forward guard names the module, step and inputs; anomaly mode names
the backward operation; hooks and the anomaly setting are always restored."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kiln.inspect.anomaly import (
    AnomalyError,
    NonFiniteGuard,
    NonFiniteOutputError,
    detect_anomaly,
)
from kiln.inspect.hooks import hook_count
from kiln.train.guard import NonFiniteError


class _Inject(nn.Module):
    """Identity until ``armed``, then writes a NaN into its output."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            return x * 1.0
        out = x.clone()
        out[0, 0] = float("nan")
        return out


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 6), _Inject(), nn.ReLU())
    return nn.Sequential(block, nn.Linear(6, 2))


def test_guard_names_the_module_the_step_and_its_input() -> None:
    net = _net()
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]]).repeat(3, 1)
    caught = None
    with NonFiniteGuard(net) as guard:
        for step in range(5):
            guard.step = step
            net[0][1].armed = step == 3
            try:
                net(x).sum().backward()
            except NonFiniteOutputError as err:
                caught = err
                break
    assert caught is not None and isinstance(caught, NonFiniteError)
    report = caught.report
    assert (report.module, report.type, report.step) == ("0.1", "_Inject", 3)
    assert report.output_nonfinite == 1 and report.output_numel == 18
    (given,) = report.inputs  # what the Linear before it produced, all finite
    expected = net[0][0](x).detach()
    assert given.shape == (3, 6) and given.nonfinite == 0
    assert given.min == pytest.approx(float(expected.min()))
    assert given.max == pytest.approx(float(expected.max()))
    assert given.mean == pytest.approx(float(expected.mean()))
    assert "module '0.1' (_Inject)" in str(report) and "step 3" in str(report)
    assert hook_count(net) == 0


def test_guard_names_a_layer_whose_weights_went_nan_and_a_bad_input() -> None:
    net = _net()
    with torch.no_grad():
        net[1].weight[0, 0] = float("nan")
    with NonFiniteGuard(net, raise_error=False) as guard:
        net(torch.randn(2, 4))
        net(torch.randn(2, 4))  # only the first hit is kept
    assert guard.report is not None and guard.report.module == "1"
    guard.reset()
    with NonFiniteGuard(_net(), raise_error=False) as guard:
        guard.model(torch.tensor([[float("inf"), 0.0, 0.0, 0.0]]))
    assert guard.report is not None and guard.report.module == "<input>"
    assert guard.report.inputs[0].nonfinite == 1


def test_detect_anomaly_names_the_backward_operation_and_restores_the_mode() -> None:
    assert not torch.is_anomaly_enabled()
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    with pytest.raises(AnomalyError) as info, detect_anomaly():
        assert torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
        y = torch.sqrt(x)  # d sqrt / dx at 0 is inf; times a zero upstream gradient: NaN
        (y * 0).sum().backward()
    assert info.value.operation == "SqrtBackward0"
    assert info.value.forward_line is not None and "test_anomaly.py" in info.value.forward_line
    assert "torch.sqrt(x)" in info.value.forward_line
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not torch.is_anomaly_enabled()


def test_detect_anomaly_in_a_loop_guards_the_forward_and_keeps_other_warnings() -> None:
    net = _net()
    hits = []
    for step in range(3):
        net[0][1].armed = step == 2
        try:
            with detect_anomaly(net, step=step) as guard:
                assert guard is not None and guard.step == step
                net(torch.randn(2, 4)).sum().backward()
        except NonFiniteOutputError as err:
            hits.append(err.report.step)
    assert hits == [2] and hook_count(net) == 0 and not torch.is_anomaly_enabled()
    with pytest.warns(UserWarning, match="still shown"), detect_anomaly():
        warnings.warn("still shown", UserWarning, stacklevel=1)

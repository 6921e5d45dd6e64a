"""kiln.train.nonfinite: one mechanism names where a NaN/Inf is, for the trainer and inspect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.inspect import NonFiniteGuard as InspectGuard
from kiln.train.diagnosis import describe_nonfinite
from kiln.train.guard import NonFiniteError
from kiln.train.nonfinite import (
    INPUT,
    NonFiniteGuard,
    NonFiniteOutputError,
    first_nonfinite_module,
    nonfinite_grads,
)


class TwoHeads(nn.Module):
    """A model whose output is a dict, with a container around the layer that goes bad."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        self.a, self.b = nn.Linear(2, 1), nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


def test_first_nonfinite_module_is_found_and_hooks_removed() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    assert first_nonfinite_module(net, torch.ones(1, 2)) is None
    with torch.no_grad():
        net[2].bias.fill_(float("nan"))
    assert first_nonfinite_module(net, torch.ones(1, 2)) == ("2", "Linear")
    assert first_nonfinite_module(net, torch.full((1, 2), float("inf"))) == (INPUT, "Sequential")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("bad", ["body.0", "b"])
def test_the_trainer_and_inspect_name_the_same_module(bad: str) -> None:
    net = TwoHeads()
    with torch.no_grad():
        net.get_submodule(bad).weight.fill_(float("inf"))
    x = torch.ones(3, 2)
    where = first_nonfinite_module(net, x)
    with InspectGuard(net, raise_error=False) as guard:
        net(x)
    assert guard.report is not None
    assert where == (guard.report.module, guard.report.type) == (bad, "Linear")
    assert InspectGuard is NonFiniteGuard  # one class, re-exported by kiln.inspect


def test_a_raising_guard_raises_the_trainers_error_family() -> None:
    net = nn.Sequential(nn.Linear(2, 1))
    with (
        pytest.raises(NonFiniteOutputError) as info,
        NonFiniteGuard(net, step=4),
    ):
        net(torch.tensor([[float("nan"), 0.0]]))
    assert isinstance(info.value, NonFiniteError) and info.value.report.step == 4


def test_nonfinite_grads_names_parameters() -> None:
    net = nn.Linear(2, 1)
    net(torch.tensor([[float("inf"), 1.0]])).sum().backward()
    assert nonfinite_grads(net) == ["weight"]


class NaNInItsOwnForward(nn.Module):
    """The NaN comes from the model's own forward, not from a child module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float("nan")


def test_a_nan_from_the_models_own_forward_is_named_by_its_class() -> None:
    # The locator reports the root as ""; the message must not say "module ''".
    text = describe_nonfinite(NaNInItsOwnForward(), torch.ones(1, 2), [])
    assert "first non-finite output in module 'NaNInItsOwnForward' (NaNInItsOwnForward)" in text
    assert "''" not in text

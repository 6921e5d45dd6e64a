"""The physics-informed network example solves u'' = -pi^2 sin(pi x), u(0) = u(1) = 0."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import torch
from runners import ROOT


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_second_derivative_is_exact_on_a_known_function() -> None:
    pinn = _example("pinn_poisson")
    # A one-unit tanh net u(x) = tanh(a x + b): u'' = -2 a^2 tanh (1 - tanh^2).
    linear = torch.nn.Linear(1, 1).double()
    net = torch.nn.Sequential(linear, torch.nn.Tanh())
    a, b = linear.weight.item(), linear.bias.item()
    x = torch.linspace(0, 1, 7, dtype=torch.float64).unsqueeze(1)
    t = torch.tanh(a * x + b)
    torch.testing.assert_close(pinn.second_derivative(net, x), -2 * a**2 * t * (1 - t**2))


def test_pinn_matches_the_analytic_solution() -> None:
    pinn = _example("pinn_poisson")
    result = pinn.main(adam_steps=200, lbfgs_steps=100, verbose=False)
    assert result.max_error < 1e-2, result.max_error
    # The residual, not the error, is what training saw: it must be small too.
    assert result.final_loss < 1e-3, result.final_loss
    x = torch.tensor([[0.0], [0.25], [0.5], [1.0]], dtype=torch.float64)
    with torch.no_grad():
        u = result.model(x).flatten().tolist()
    for got, want in zip(u, [0.0, math.sin(math.pi / 4), 1.0, 0.0], strict=True):
        assert abs(got - want) < 1e-2

"""Hooks by module name: the right tensors are captured and every hook is removed, always."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.inspect.hooks import (
    backward_hooks,
    capture_activations,
    capture_gradients,
    forward_hooks,
    hook_count,
    no_inplace,
    select_modules,
)
from kiln.models import ResNet


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(num_classes=3, in_channels=1, depths=(1, 1), width=4).eval()


def test_activations_have_the_shapes_of_each_module_output() -> None:
    net = _resnet()
    names = ["stem.0", "stages.0.0", "stages.1.0.branch.conv1", "pool", "fc"]
    with capture_activations(net, names) as acts:
        out = net(torch.randn(2, 1, 8, 8))
    assert {k: tuple(v.shape) for k, v in acts.items()} == {
        "stem.0": (2, 4, 8, 8),
        "stages.0.0": (2, 4, 8, 8),
        "stages.1.0.branch.conv1": (2, 8, 4, 4),
        "pool": (2, 8),
        "fc": (2, 3),
    }
    torch.testing.assert_close(acts["fc"], out)  # the very output, detached
    assert not acts["fc"].requires_grad
    assert hook_count(net) == 0


def test_default_is_every_leaf_module() -> None:
    net = _resnet()
    leaves = [n for n, m in net.named_modules() if n and not list(m.children())]
    with capture_activations(net) as acts:
        net(torch.randn(1, 1, 8, 8))
    assert sorted(acts) == sorted(leaves)


def test_gradients_equal_autograd_of_the_output() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with capture_activations(net, ["1"], detach=False) as acts, capture_gradients(net) as grads:
        loss = (net(x) ** 2).sum()
        (expected,) = torch.autograd.grad(loss, acts["1"], retain_graph=True)
        loss.backward()
    assert {k: tuple(v.shape) for k, v in grads.items()} == {"0": (5, 4), "1": (5, 4), "2": (5, 2)}
    torch.testing.assert_close(grads["1"], expected)
    torch.testing.assert_close(grads["2"], 2 * net(x).detach())
    assert hook_count(net) == 0


def test_hooks_are_removed_when_the_forward_raises() -> None:
    net = nn.Sequential(nn.Linear(2, 2), _Boom())
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_activations(net) as acts,
        capture_gradients(net),
    ):
        net(torch.randn(1, 2))
    assert set(acts) == {"0"}  # the module before the failure was captured
    assert hook_count(net) == 0
    with (
        pytest.raises(RuntimeError, match="boom"),
        forward_hooks(net, lambda *a: None, ["0", "1"]),
        backward_hooks(net, lambda *a: None),
    ):
        net(torch.randn(1, 2))
    assert hook_count(net) == 0


def test_hooks_are_removed_when_the_callback_raises() -> None:
    net = nn.Sequential(nn.Linear(2, 2))

    def bad(*args: object) -> None:
        raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed"), forward_hooks(net, bad):
        net(torch.randn(1, 2))
    assert hook_count(net) == 0


def test_unknown_names_are_refused_with_a_suggestion() -> None:
    net = _resnet()
    with pytest.raises(ValueError, match=r"did you mean 'stages\.0\.0\.branch\.bn1'"):
        select_modules(net, ["stages.0.0.brnch.bn1"])
    with pytest.raises(ValueError, match="no module 'nope'"), capture_activations(net, ["nope"]):
        pass
    assert hook_count(net) == 0


def test_inplace_modules_need_no_inplace_for_gradients() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no_inplace"), capture_gradients(net):
        pass
    with no_inplace(net), capture_gradients(net) as grads:
        net(torch.randn(2, 3)).sum().backward()
    assert set(grads) == {"0", "1", "2"}
    assert net[1].inplace is True and hook_count(net) == 0

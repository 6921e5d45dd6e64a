"""MLP: output shapes for each task, flattening, options, and that it can fit a tiny batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from training import overfit_losses

from kiln.data.base import DataInfo
from kiln.models import MLP, build_mlp
from kiln.models.mlp import Activation, Norm


def test_classification_and_regression_shapes() -> None:
    clf = build_mlp(DataInfo("classification", (20,), num_classes=5), hidden=(16,))
    reg = build_mlp(DataInfo("regression", (20,), num_outputs=3), hidden=(16,))
    x = torch.randn(4, 20)
    assert clf(x).shape == (4, 5)
    assert reg(x).shape == (4, 3)


def test_flattens_image_input() -> None:
    net = build_mlp(DataInfo("classification", (1, 8, 8), num_classes=10), hidden=(16,))
    assert net.hidden[0].in_features == 64
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net(x), net(x.reshape(3, 64)))


def test_linear_when_no_hidden_layers() -> None:
    net = MLP(6, 2, hidden=())
    assert len(net.hidden) == 0
    x = torch.randn(5, 6)
    torch.testing.assert_close(net(x), x @ net.fc.weight.T + net.fc.bias)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_activation_and_norm_options(activation: Activation, norm: Norm) -> None:
    net = MLP(8, 3, hidden=(16, 16), activation=activation, norm=norm, dropout=0.1)
    norms = {"none": (), "batch": (nn.BatchNorm1d,), "layer": (nn.LayerNorm,)}[norm]
    assert sum(isinstance(m, norms) for m in net.modules()) == (2 if norms else 0)
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    assert net(torch.randn(4, 8)).shape == (4, 3)


def test_bad_options_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'gelo'; did you mean 'gelu'\?"):
        MLP(4, 2, activation="gelo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"allowed: none, batch, layer"):
        MLP(4, 2, norm="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"positive integers"):
        MLP(4, 2, hidden=(8, 0))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        MLP(4, 2, dropout=1.0)


def test_lm_task_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.name=gpt"):
        build_mlp(DataInfo("lm", (16,), vocab_size=30))


def test_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
    net = MLP(10, 4, hidden=(64,))
    losses = overfit_losses(net, x, y)
    assert losses[-1] < 0.5 * losses[0]

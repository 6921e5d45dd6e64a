"""ResNet: shapes, shortcuts, zero-init residual, initialisation and fitting a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from training import overfit_losses

from kiln.data.base import DataInfo
from kiln.models import BasicBlock, ResNet, build_resnet


@pytest.mark.parametrize("size", [8, 9, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_for_any_image_size(size: int, channels: int) -> None:
    net = build_resnet(
        DataInfo("classification", (channels, size, size), num_classes=7), depths=(1, 1), width=4
    )
    assert net(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_stages_double_channels_and_halve_resolution() -> None:
    net = ResNet(num_classes=3, in_channels=1, depths=(2, 1, 1), width=4)
    x = net.stem(torch.randn(1, 1, 16, 16))
    shapes = []
    for stage in net.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(4, 16, 16), (8, 8, 8), (16, 4, 4)]
    assert [len(s) for s in net.stages] == [2, 1, 1]


def test_projection_shortcut_when_shape_changes() -> None:
    identity = BasicBlock(8, 8)
    strided = BasicBlock(8, 8, stride=2)
    wider = BasicBlock(8, 16)
    assert isinstance(identity.shortcut, nn.Identity)
    for block in (strided, wider):
        conv = block.shortcut[0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
        assert isinstance(block.shortcut[1], nn.BatchNorm2d)
    assert strided.shortcut[0].stride == (2, 2)
    x = torch.randn(2, 8, 8, 8)
    assert strided(x).shape == (2, 8, 4, 4)
    assert wider(x).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("train", [True, False])
def test_zero_init_residual_makes_blocks_start_as_their_shortcut(train: bool) -> None:
    torch.manual_seed(0)
    net = ResNet(num_classes=2, in_channels=3, depths=(1, 1), width=8, zero_init_residual=True)
    net.train(train)
    identity_block, projection_block = net.stages[0][0], net.stages[1][0]
    assert isinstance(identity_block.shortcut, nn.Identity)
    x = torch.randn(4, 8, 8, 8)
    torch.testing.assert_close(identity_block(x), torch.relu(x))
    torch.testing.assert_close(projection_block(x), torch.relu(projection_block.shortcut(x)))
    # Without the flag the branch contributes, so the same check must fail.
    plain = ResNet(num_classes=2, in_channels=3, depths=(1, 1), width=8).stages[0][0]
    assert not torch.allclose(plain(x), torch.relu(x))


def test_kaiming_fan_out_init_and_bn_constants() -> None:
    torch.manual_seed(0)
    net = ResNet(num_classes=2, in_channels=3, depths=(1,), width=64)
    conv = net.stages[0][0].branch.conv2
    expected = math.sqrt(2.0 / (64 * 3 * 3))  # gain sqrt(2) for relu, fan_out = C_out * k * k
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_optional_dropout_before_fc() -> None:
    assert isinstance(ResNet(2, dropout=0.0).drop, nn.Identity)
    drop = ResNet(2, dropout=0.3).drop
    assert isinstance(drop, nn.Dropout) and drop.p == 0.3


def test_builder_refuses_other_tasks_and_flat_inputs() -> None:
    with pytest.raises(ValueError, match="is a classifier"):
        build_resnet(DataInfo("regression", (1, 8, 8)))
    with pytest.raises(ValueError, match=r"data.layout=image"):
        build_resnet(DataInfo("classification", (64,), num_classes=10))
    with pytest.raises(ValueError, match="depths"):
        ResNet(2, depths=(1, 0))


def test_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    net = ResNet(num_classes=4, in_channels=1, depths=(1, 1), width=8)
    losses = overfit_losses(net, x, y)
    assert losses[-1] < 0.5 * losses[0]

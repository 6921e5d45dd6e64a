"""Model summary: output shapes, parameter counts (tied weights once) and MACs per module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.inspect.hooks import hook_count
from kiln.inspect.summary import count_macs, human, model_summary
from kiln.models import GPT, ResNet
from kiln.models.summary import count_parameters


def test_linear_macs_are_in_times_out_times_batch() -> None:
    net = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    s = model_summary(net, torch.randn(11, 7))
    assert s.row("0").macs == 7 * 5 * 11
    assert s.row("1").macs == 0  # elementwise: not counted
    assert s.row("2").macs == 5 * 3 * 11
    assert s.total_macs == 11 * (7 * 5 + 5 * 3)
    assert s.row("0").output_shape == (11, 5) and s.output_shape == (11, 3)
    assert (s.row("0").params, s.row("2").params, s.total_params) == (40, 18, 58)
    assert hook_count(net) == 0


def test_conv_macs_follow_the_formula() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, groups=1)
    net = nn.Sequential(conv, nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False))
    s = model_summary(net, torch.randn(2, 3, 10, 10))
    assert s.row("0").output_shape == (2, 8, 5, 5)
    assert s.row("0").macs == 2 * 8 * 5 * 5 * (3 * 3 * 3)
    assert s.row("1").macs == 2 * 8 * 5 * 5 * (8 // 4 * 3 * 3)


def test_containers_sum_their_children_and_params_match_count_parameters() -> None:
    net = ResNet(num_classes=4, in_channels=1, depths=(1, 1), width=4)
    x = torch.randn(3, 1, 8, 8)
    s = model_summary(net, x)
    macs = count_macs(net, x)
    assert s.total_macs == macs[""]
    block = s.row("stages.1.0")
    children = ["stages.1.0.branch.conv1", "stages.1.0.branch.conv2", "stages.1.0.shortcut.0"]
    assert block.macs == sum(s.row(c).macs for c in children) > 0
    for r in count_parameters(net, depth=1).rows:
        assert s.row(r.name).params == r.total
    deep = count_parameters(net, depth=3)
    assert s.row("stages.1.0").params == next(r.total for r in deep.rows if r.name == "stages.1.0")
    assert s.total_params == count_parameters(net).total
    assert [r.name for r in model_summary(net, x, max_depth=1).rows] == [
        "stem",
        "stages",
        "pool",
        "drop",
        "fc",
    ]


def test_tied_weights_are_counted_once() -> None:
    gpt = GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8)
    s = model_summary(gpt, torch.randint(0, 10, (2, 4)))
    assert s.total_params == count_parameters(gpt).total
    assert s.row("lm_head").shared == 80 and s.row("lm_head").params == 0
    assert s.row("lm_head").macs == 2 * 4 * 8 * 10


def test_table_renders_and_bad_depth_is_refused() -> None:
    from rich.console import Console

    s = model_summary(nn.Sequential(nn.Linear(2, 3)), torch.randn(4, 2))
    console = Console(width=120, record=True)
    console.print(s.table())
    text = console.export_text()
    assert "Linear" in text and "[4, 3]" in text and "24" in text
    assert human(2_500_000) == "2.5M"
    with pytest.raises(ValueError, match="max_depth"):
        model_summary(nn.Linear(2, 2), torch.randn(1, 2), max_depth=0)

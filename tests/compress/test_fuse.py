"""Fusion: folded Conv/Linear + BatchNorm (+ ReLU) and merged linear chains equal the original."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from runners import ROOT
from torch import nn

from kiln.compress.fuse import UntraceableError, fold_linear, fuse, fuse_sequential
from kiln.config import load_config
from kiln.train.build import build_data_for, build_model_for


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones fold to identity)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))  # type: ignore[union-attr]
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)  # type: ignore[union-attr]
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


class UserNet(nn.Module):
    """A user's model: Conv1d + BN + functional ReLU, a linear chain, dropout, a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.a = nn.Linear(8 * 16, 32)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(32, 24)
        self.c = nn.Linear(24, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        y = y + self.bn2(self.conv2(y))  # conv-bn without ReLU; BN output used once
        z = self.c(self.b(self.drop(self.a(y.flatten(1)))))
        return self.head(torch.tanh(z))  # the tanh keeps `head` out of the chain


def test_fold_linear_equals_the_two_layers() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    for bias1, bias2 in [(True, True), (False, True), (True, False), (False, False)]:
        a, b = nn.Linear(5, 6, bias=bias1), nn.Linear(6, 3, bias=bias2)
        folded = fold_linear(a, b)
        assert (folded.bias is None) == (not bias1 and not bias2)
        torch.testing.assert_close(folded(x), b(a(x)), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="do not chain"):
        fold_linear(nn.Linear(2, 3), nn.Linear(4, 1))


def test_resnet_from_the_digits_config_fuses_and_matches() -> None:
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["model.kwargs.depths=[1,1]"])
    model = _randomize_bn(build_model_for(cfg, build_data_for(cfg).info))
    fused, report = fuse(model)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    # stem + 2 blocks' first conv end in ReLU; 2 second convs + 1 projection shortcut do not.
    assert report.counts() == {"conv-bn-relu": 3, "conv-bn": 3}
    assert report.fusions[0].names == ("stem.0", "stem.1", "stem.2")
    assert report.fusions[0].into == "stem.0"
    assert _count(fused, nn.BatchNorm2d) == 0
    assert _count(model, nn.BatchNorm2d) == 6  # the original is untouched
    assert "drop" in report.removed


def test_user_model_linear_chain_and_conv_bn_relu() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(UserNet())
    fused, report = fuse(model)
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    assert report.counts() == {"conv-bn-relu": 1, "conv-bn": 1, "linear-linear": 1}
    chain = next(f for f in report.fusions if f.kind == "linear-linear")
    assert chain.names == ("a", "b", "c") and chain.into == "c"
    relu = next(f for f in report.fusions if f.kind == "conv-bn-relu")
    assert relu.names == ("conv", "bn", "relu")
    assert report.removed == ["drop"]
    assert _count(fused, nn.Linear) == 2  # a-b-c folded into one; head kept
    assert str(report) == "conv-bn-relu x1, conv-bn x1, linear-linear x1"


def test_bottleneck_chain_is_kept_and_shared_outputs_or_modules_are_not_fused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down, self.up = nn.Linear(64, 4), nn.Linear(4, 64)
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
            self.pre, self.twice = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
            c = self.conv(img)
            both = self.bn(c) + c  # the conv output has two users: BN cannot fold into it
            y = x[:, :8]
            shared = self.twice(self.pre(y)) + self.twice(y)  # `twice` is called twice
            return self.up(self.down(x)).sum() + both.sum() + shared.sum()

    model = _randomize_bn(Net())
    fused, report = fuse(model)
    assert report.fusions == []
    assert any("bottleneck" in k for k in report.kept)
    x, img = torch.randn(2, 64), torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, img), model(x, img))


class Branchy(nn.Module):
    """Untraceable: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.flatten(1))


def test_untraceable_model_gets_a_clear_error_and_fuse_sequential_works() -> None:
    model = _randomize_bn(Branchy())
    with pytest.raises(UntraceableError) as info:
        fuse(model)
    message = str(info.value)
    assert "cannot trace Branchy" in message
    for advice in ("torch.where", "leaf_modules", "fuse_sequential"):
        assert advice in message
    fused, report = fuse_sequential(model)
    assert report.counts() == {"conv-bn-relu": 1}
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    assert _count(model, nn.BatchNorm2d) == 1


def test_leaf_modules_make_an_untraceable_part_opaque() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Branchy()
            self.a, self.b = nn.Linear(10, 10), nn.Linear(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.inner(x)))

    model = _randomize_bn(Wrapper())
    fused, report = fuse(model, leaf_modules=[Branchy])
    assert report.counts() == {"linear-linear": 1}
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)

"""Model surgery: freezing, head replacement, truncation, adapters, layer-wise LR decay."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import kiln.models.surgery as surgery_module
from kiln.config import OptimConfig
from kiln.models import GPT, MLP, ResNet
from kiln.models.features import get_features
from kiln.models.pretrained import layer_groups, layerwise_lr_decay
from kiln.models.surgery import (
    Adapter,
    count_parameters,
    freeze,
    insert_adapter,
    replace_head,
    truncate,
    unfreeze,
)
from kiln.train.optim import build_optimizer, param_groups


class UserNet(nn.Module):
    """A user's own model: a lone wrapper around its layers, heads nested two deep."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 8),
            nn.ReLU(),
            nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
            nn.Linear(8, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(num_classes=10, in_channels=1, depths=(1, 1), width=4).eval()


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8).eval()


def test_docstring_examples() -> None:
    result = doctest.testmod(
        surgery_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


def test_frozen_params_get_no_grad_and_stay_out_of_the_optimizer() -> None:
    net = _resnet()
    report = freeze(net, "stem", types=nn.BatchNorm2d)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert set(report.changed) == frozen
    assert {"stem.0.weight", "stem.1.weight", "stages.1.0.branch.bn2.bias"} <= frozen
    assert "stages.0.0.branch.conv1.weight" not in frozen
    counts = count_parameters(net)
    assert report.trainable == counts.trainable < report.total == counts.total
    assert report.changed_elements == counts.frozen
    assert "froze" in str(report) and f"{counts.trainable:,}" in str(report)

    net.train()
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    for n, p in net.named_parameters():
        assert (p.grad is None) == (n in frozen), n
    opt = build_optimizer(net, OptimConfig(name="sgd", lr=0.1, weight_decay=0.01))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters() if p.requires_grad}


def test_unfreeze_reports_only_what_changed() -> None:
    net = _resnet()
    freeze(net, "stem")
    report = unfreeze(net, ["stem.0", "fc"])
    assert report.changed == ("stem.0.weight",)
    assert set(report.matched) == {"stem.0.weight", "fc.weight", "fc.bias"}
    assert "already" in str(report)
    assert net.stem[0].weight.requires_grad and not net.stem[1].weight.requires_grad


def test_freeze_errors_list_candidates() -> None:
    net = _resnet()
    with pytest.raises(ValueError, match=r"did you mean 'stem'"):
        freeze(net, "stemm")
    with pytest.raises(ValueError, match=r"did you mean 'BatchNorm2d'.*Conv2d"):
        freeze(net, types="BatchNorm1d")
    with pytest.raises(ValueError, match=r"no parameter .* 'LayerNorm'"):
        freeze(net, types=nn.LayerNorm)
    with pytest.raises(ValueError, match=r"give parameter-name patterns"):
        freeze(net)
    assert all(p.requires_grad for p in net.parameters())


def test_replace_head_finds_last_linear_and_trains() -> None:
    net = _resnet()
    assert replace_head(net, 3) == "fc"
    assert isinstance(net.fc, nn.Linear) and net.fc.out_features == 3
    assert net.fc.in_features == 8
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net(x).shape == (8, 3)
    assert losses[-1] < losses[0]


def test_replace_head_user_model_nested_and_by_name() -> None:
    net = UserNet()
    net.net.double()
    assert replace_head(net, 2) == "net.3"
    assert net.net[3].out_features == 2 and net.net[3].weight.dtype == torch.float64
    assert replace_head(net, 5, "net.2.0") == "net.2.0"
    assert net.net[2][0].out_features == 5
    with pytest.raises(ValueError, match=r"not an nn.Linear.*did you mean 'net.2.0'"):
        replace_head(net, 2, "net.2")
    with pytest.raises(ValueError, match=r"did you mean 'net.3'"):
        replace_head(net, 2, "net.33")
    with pytest.raises(ValueError, match=r"no nn.Linear"):
        replace_head(nn.Sequential(nn.ReLU()), 2)


def test_replace_head_refuses_tied_gpt_head_unless_untied() -> None:
    gpt = _gpt()
    with pytest.raises(ValueError, match=r"tied to tok_emb.weight.*untie=True"):
        replace_head(gpt, 4)
    assert gpt.lm_head.weight is gpt.tok_emb.weight
    assert replace_head(gpt, 4, untie=True) == "lm_head"
    assert gpt.lm_head.weight is not gpt.tok_emb.weight
    assert gpt(torch.randint(0, 11, (2, 6))).shape == (2, 6, 4)


def test_truncate_outputs_the_penultimate_features() -> None:
    net = _resnet()
    x = torch.randn(3, 1, 8, 8)
    expected = get_features(net, x, ["drop"])["drop"]
    assert truncate(net) == ["fc"]
    assert isinstance(net.fc, nn.Identity)
    out = net(x)
    assert out.shape == (3, 8) and torch.equal(out, expected)


def test_truncate_after_a_block() -> None:
    net = _resnet()
    x = torch.randn(2, 1, 8, 8)
    expected = get_features(net, x, ["stages.0"])["stages.0"]
    assert truncate(net, after="stages.0") == ["stages.1", "pool", "drop", "fc"]
    assert torch.equal(net(x), expected)

    gpt = _gpt()
    idx = torch.randint(0, 11, (2, 6))
    expected = get_features(gpt, idx, ["blocks.0"])["blocks.0"]
    assert truncate(gpt, after="blocks.0") == ["blocks.1", "ln_f", "lm_head"]
    assert torch.equal(gpt(idx), expected)
    with pytest.raises(ValueError, match=r"did you mean 'blocks.0'"):
        truncate(gpt, after="blocks.00")


def test_truncate_descends_through_a_lone_wrapper() -> None:
    net = UserNet()
    x = torch.randn(2, 6)
    expected = get_features(net, x, ["net.2"])["net.2"]
    assert truncate(net) == ["net.3"]
    assert torch.equal(net(x), expected)
    with pytest.raises(ValueError, match=r"drop_last must be in"):
        truncate(MLP(4, 2, hidden=(3,)), drop_last=3)


def test_adapters_leave_outputs_unchanged_then_train() -> None:
    net = _resnet()
    x = torch.randn(2, 1, 8, 8)
    before = net(x)
    insert_adapter(net, "stages.0", Adapter(4, 2, channel_dim=1))
    insert_adapter(net, "fc", Adapter(8, 2), position="before")
    assert torch.equal(net(x), before)
    assert isinstance(net.fc, nn.Sequential) and list(net.fc._modules) == ["adapter", "base"]
    freeze(net, "*")
    report = unfreeze(net, "*.adapter.*")
    assert set(report.changed) == {
        f"{m}.adapter.{p}.{w}"
        for m in ("stages.0", "fc")
        for p in ("down", "up")
        for w in ("weight", "bias")
    }
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net(x).square().sum().backward()
    opt.step()
    assert not torch.equal(net(x), before)

    gpt = _gpt()
    idx = torch.randint(0, 11, (2, 6))
    ref = gpt(idx)
    insert_adapter(gpt, "blocks.1.mlp", Adapter(8, 3))
    assert torch.equal(gpt(idx), ref)
    with pytest.raises(ValueError, match=r"did you mean 'after'"):
        insert_adapter(gpt, "ln_f", Adapter(8, 2), position="afterr")  # type: ignore[arg-type]


def test_layerwise_lr_decay_resnet_and_optimizer_groups() -> None:
    net = ResNet(num_classes=2, in_channels=1, depths=(2, 1), width=4)
    mults = layerwise_lr_decay(net, 0.5)
    assert mults == {
        "fc.*": 1.0,
        "stages.1.0.*": 1.0,
        "stages.0.1.*": 0.5,
        "stages.0.0.*": 0.25,
        "stem.*": 0.125,
    }
    cfg = OptimConfig(lr=0.1, lr_mult=mults)
    lr_of = {id(p): g["lr"] for g in param_groups(net, cfg) for p in g["params"]}
    assert lr_of[id(net.stem[0].weight)] == pytest.approx(0.0125)
    assert lr_of[id(net.stages[0][1].branch.conv1.weight)] == pytest.approx(0.05)
    assert lr_of[id(net.fc.weight)] == pytest.approx(0.1)


def test_layerwise_lr_decay_gpt_tied_weight_takes_the_head_rate() -> None:
    gpt = _gpt()
    mults = layerwise_lr_decay(gpt, 0.5)
    assert mults == {
        "ln_f.*": 1.0,
        "lm_head.*": 1.0,
        "blocks.1.*": 1.0,
        "blocks.0.*": 0.5,
        "tok_emb.*": 0.25,
        "pos_emb.*": 0.25,
    }
    groups = param_groups(gpt, OptimConfig(lr=1.0, lr_mult=mults))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(gpt.tok_emb.weight)] == 1.0
    assert lr_of[id(gpt.pos_emb.weight)] == 0.25


def test_layer_groups_generic_fallback() -> None:
    class WithToken(UserNet):
        def __init__(self) -> None:
            super().__init__()
            self.cls = nn.Parameter(torch.zeros(8))

    assert layer_groups(WithToken()) == [
        ["cls", "net.0.*"],
        ["net.2.*"],
        ["net.3.*"],
    ]
    mults = layerwise_lr_decay(MLP(4, 2, hidden=(8, 8)), 0.1)
    assert mults == {"fc.*": 1.0, "hidden.2.*": 1.0, "hidden.0.*": pytest.approx(0.1)}
    with pytest.raises(ValueError, match=r"decay must be in"):
        layerwise_lr_decay(MLP(4, 2), 0.0)

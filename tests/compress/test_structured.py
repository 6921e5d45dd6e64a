"""Structured pruning: which layers shrink, exact equivalence, sizes, save/load, digits accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runners import ROOT
from torch import nn

from kiln.compress.prune.core import (
    PruneSpec,
    load_pruned,
    prune_model,
)
from kiln.compress.prune.run import initial_state, kiln_metadata, trainer_finetune
from kiln.compress.prune.structured import (
    find_groups,
    param_count,
    prune_structured,
    resize_,
    slice_state,
    widths,
)
from kiln.config import load_config
from kiln.models.mlp import MLP
from kiln.models.resnet import ResNet
from kiln.train.build import build_data_for
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer

QUIET = ["log.tensorboard=false", "log.progress=false", "checkpoint.every_epoch=false"]


def _resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(num_classes=4, in_channels=1, depths=(2, 1), width=8, drop_path=0.1)


def _randomize_bn(net: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so slicing them wrongly would show in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))  # type: ignore[union-attr]
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[union-attr]
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g))


def test_groups_of_an_mlp_cover_every_hidden_layer() -> None:
    net = MLP(20, 3, hidden=(16, 12, 8), dropout=0.1, norm="batch")
    groups = find_groups(net)
    assert [(g.producer, g.norms, g.consumer) for g in groups] == [
        ("hidden.0", ["hidden.1"], "hidden.4"),
        ("hidden.4", ["hidden.5"], "hidden.8"),
        ("hidden.8", ["hidden.9"], "fc"),
    ]
    layer_norm = MLP(20, 3, hidden=(16,), activation="gelu", norm="layer")
    assert [(g.producer, g.norms, g.consumer) for g in find_groups(layer_norm)] == [
        ("hidden.0", ["hidden.1"], "fc")
    ]


def test_groups_of_a_resnet_are_the_inner_block_channels_only() -> None:
    groups = find_groups(_resnet())
    blocks = ["stages.0.0", "stages.0.1", "stages.1.0"]
    assert [(g.producer, g.norms, g.consumer) for g in groups] == [
        (f"{b}.branch.conv1", [f"{b}.branch.bn1"], f"{b}.branch.conv2") for b in blocks
    ]


def test_pruning_dead_channels_changes_no_output() -> None:
    """Channels whose producer weights are zero are the ones removed, and the outputs are equal:
    the slicing of producer, norm statistics and consumer is exact."""
    for net, x in (
        (MLP(10, 3, hidden=(8, 6), norm="batch"), torch.randn(5, 10)),
        (_resnet(), torch.randn(2, 1, 8, 8)),
    ):
        _randomize_bn(net)
        groups = find_groups(net)
        modules = dict(net.named_modules())
        with torch.no_grad():
            for g in groups:
                producer = modules[g.producer]
                n = producer.weight.shape[0]
                drop = torch.arange(0, n, 2)  # every other channel
                producer.weight[drop] = 0
                for norm in g.norms:  # a zero input must stay zero after the norm and ReLU
                    bn = modules[norm]
                    bn.running_mean[drop] = 0  # type: ignore[index]
                    bn.bias[drop] = -1.0  # type: ignore[index]
                if producer.bias is not None:
                    producer.bias[drop] = 0
        net.eval()
        before = net(x)
        res = prune_structured(net, 0.5)
        for g in groups:
            assert res.kept[g.producer].tolist() == list(range(1, res.before[g.producer], 2))
        torch.testing.assert_close(net(x), before)


def test_mlp_sizes_and_parameter_count() -> None:
    net = MLP(64, 10, hidden=(256, 256), dropout=0.1)
    keys = sorted(net.state_dict())
    assert param_count(net) == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    res = prune_structured(net, 0.5, norm="l2")
    assert res.after == {"hidden.0": 128, "hidden.3": 128}
    assert param_count(net) == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert sorted(net.state_dict()) == keys
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    small = MLP(4, 2, hidden=(3,))
    assert prune_structured(small, 0.9).after == {"hidden.0": 1}  # one channel always stays


def test_resnet_shrinks_inside_blocks_and_keeps_block_outputs() -> None:
    net = _resnet()
    x = torch.randn(3, 1, 8, 8)
    before_params = param_count(net)
    before = widths(net)
    res = prune_structured(net, 0.5)
    assert net(x).shape == (3, 4)
    assert param_count(net) < before_params
    after = widths(net)
    for block, width in (("stages.0.0", 8), ("stages.0.1", 8), ("stages.1.0", 16)):
        b = f"{block}.branch"
        assert after[f"{b}.conv1"] == {"in_channels": before[f"{b}.conv1"]["in_channels"],
                                       "out_channels": width // 2}  # fmt: skip
        assert after[f"{b}.bn1"] == {"num_features": width // 2}
        assert after[f"{b}.conv2"] == {"in_channels": width // 2, "out_channels": width}
        assert after[f"{b}.bn2"] == {"num_features": width}  # the residual sum's width
    assert after["stem.0"] == before["stem.0"] and after["fc"] == before["fc"]
    assert after["stages.1.0.shortcut.0"] == before["stages.1.0.shortcut.0"]
    blocks = ("stages.0.0", "stages.0.1", "stages.1.0")
    assert set(res.after) == {f"{b}.branch.conv1" for b in blocks}
    net.train()
    net(x).sum().backward()  # trains: every new tensor is a leaf parameter with a gradient
    assert all(p.grad is not None for p in net.parameters())


def test_iterative_cycles_land_on_the_amount_and_rewind_slices_the_init() -> None:
    net = MLP(16, 3, hidden=(20, 10))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    seen: list[int] = []

    def tune(model: nn.Module, cycle: int) -> dict[str, float]:
        seen.append(model.hidden[0].out_features)
        return {}

    out = prune_model(net, PruneSpec(0.6, structured=True, cycles=3), finetune=tune, initial=start)
    assert seen[-1] == 8 and net.hidden[2].out_features == 4  # 20 - round(0.6 * 20), 10 - 6
    assert seen == sorted(seen, reverse=True) and len(seen) == 3
    assert out.method == "prune-structured"
    assert out.notes["widths"]["hidden.0"]["after"]["out_features"] == 8
    # rewound: the survivors hold their initial values, cut to the kept channels
    kept = {k: torch.tensor(v) for k, v in out.notes["kept"].items()}
    assert [len(v) for v in kept.values()] == [8, 4]
    sliced = slice_state(start, kept, find_groups(MLP(16, 3, hidden=(20, 10))))
    assert sliced.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, sliced[k], rtol=0, atol=0)
    torch.testing.assert_close(
        net.hidden[2].weight.detach(),
        start["hidden.2.weight"][kept["hidden.2"]][:, kept["hidden.0"]],
        rtol=0,
        atol=0,
    )


def test_random_importance_is_seeded() -> None:
    kept = []
    for _ in range(2):
        net = MLP(8, 2, hidden=(16,))
        res = prune_structured(net, 0.5, norm="random", generator=torch.Generator().manual_seed(3))
        kept.append(res.kept["hidden.0"])
    assert torch.equal(kept[0], kept[1])


def test_save_and_load_rebuild_the_pruned_shapes(tmp_path: Path) -> None:
    net = _resnet()
    _randomize_bn(net)
    out = prune_model(net, PruneSpec(0.5, structured=True))
    path = out.save(tmp_path / "p")
    assert out.files == [path] and (tmp_path / "p" / "pruned.json").is_file()
    loaded = load_pruned(tmp_path / "p", model=_resnet())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), net(x))
    fresh = _resnet()
    resize_(fresh, widths(net))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    with pytest.raises(ValueError, match="lacks"):
        resize_(nn.Linear(2, 2), {"x": {"in_features": 1, "out_features": 1}})


def test_bad_models_and_amounts_are_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return self.a(x)
            return x

    with pytest.raises(ValueError, match=r"torch\.fx, which cannot trace Branchy"):
        prune_structured(Branchy(), 0.5)
    with pytest.raises(ValueError, match="no layer whose outputs can be removed"):
        prune_structured(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune_structured(MLP(4, 2, hidden=(3,)), 1.0)
    with pytest.raises(ValueError, match="allowed: l1, l2, random"):
        prune_structured(MLP(4, 2, hidden=(3,)), 0.5, norm="l0")


@pytest.mark.slow
def test_digits_mlp_keeps_97_percent_at_half_the_channels(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", [*QUIET, f"out_dir={tmp_path}"])
    data = build_data_for(cfg)
    run = Trainer(cfg, data=data, verbose=False).fit().run_dir
    model = load_model(run)
    before = param_count(model)
    tune = trainer_finetune(cfg, data, epochs=5, out_dir=tmp_path / "ft")
    out = prune_model(
        model,
        PruneSpec(0.5, structured=True),
        finetune=tune,
        metadata=kiln_metadata(cfg, data.info),
    )
    assert model.hidden[0].out_features == 128 and model.hidden[3].out_features == 128
    assert param_count(model) < 0.35 * before
    metrics = out.notes["cycles"][0]["finetune"]
    assert metrics["finetuned"]["acc"] >= 0.97, metrics
    assert metrics["finetuned"]["acc"] > metrics["pruned"]["acc"]  # fine-tuning recovered some
    out.save(tmp_path / "pruned")
    x = data.test.dataset.__getitems__(data.test.indices)[0]  # type: ignore[union-attr]
    torch.testing.assert_close(load_pruned(tmp_path / "pruned")(x), model(x))
    assert initial_state(run)["hidden.0.weight"].shape == (256, 64)

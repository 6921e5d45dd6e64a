"""Unstructured pruning: exact sparsity, permanent removal, iterative cycles, rewind, fine-tune."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kiln.compress.prune.core import (
    PruneSpec,
    load_pruned,
    make_permanent,
    prunable_layers,
    prune_model,
    prune_unstructured,
    rewind_,
    sparsity,
    sparsity_schedule,
)
from kiln.compress.prune.run import initial_state, kiln_metadata, recalibrate_bn, trainer_finetune
from kiln.config import Config
from kiln.train.build import build_data_for
from kiln.train.checkpoint.weights import load_model
from kiln.train.trainer import Trainer


def _net() -> nn.Module:
    torch.manual_seed(0)
    # Odd sizes: round(amount * n) is not a multiple of anything convenient.
    return nn.Sequential(
        nn.Conv2d(3, 5, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 13),
        nn.ReLU(),
        nn.Linear(13, 7),
    )


def _masked(net: nn.Module) -> dict[str, int]:
    return {n: int((m.weight_mask == 0).sum()) for n, m in prunable_layers(net)}


@pytest.mark.parametrize("method", ["l1", "random"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_layer_scope_reaches_exact_sparsity(method: str, amount: float) -> None:
    net = _net()
    counts = prune_unstructured(net, amount, method=method)
    for name, m in prunable_layers(net):
        n = m.weight_orig.numel()
        assert counts[name] == _masked(net)[name] == round(amount * n)
        assert sparsity(net)["layers"][name]["zeros"] == round(amount * n)


@pytest.mark.parametrize("method", ["l1", "random"])
def test_global_scope_reaches_exact_total(method: str) -> None:
    net = _net()
    total = sum(m.weight.numel() for _, m in prunable_layers(net))
    prune_unstructured(net, 0.7, method=method, scope="global")
    assert sum(_masked(net).values()) == round(0.7 * total)
    assert sparsity(net)["total"]["zeros"] == round(0.7 * total)


def test_l1_removes_the_smallest_magnitudes() -> None:
    net = _net()
    prune_unstructured(net, 0.6, scope="global")
    w = torch.cat([m.weight_orig.detach().abs().flatten() for _, m in prunable_layers(net)])
    mask = torch.cat([m.weight_mask.flatten() for _, m in prunable_layers(net)])
    assert w[mask == 0].max() <= w[mask == 1].min()
    layer = _net()
    prune_unstructured(layer, 0.6)
    for _, m in prunable_layers(layer):
        w, mask = m.weight_orig.detach().abs(), m.weight_mask
        assert w[mask == 0].max() <= w[mask == 1].min()


def test_iterative_pruning_only_adds_to_the_mask() -> None:
    net = _net()
    prune_unstructured(net, 0.5)
    first = {n: m.weight_mask.clone() for n, m in prunable_layers(net)}
    prune_unstructured(net, 0.75, scope="global")
    total = sum(m.weight_mask.numel() for _, m in prunable_layers(net))
    assert sum(_masked(net).values()) == round(0.75 * total)
    for n, m in prunable_layers(net):
        assert bool((m.weight_mask <= first[n]).all())  # once pruned, always pruned


def test_schedule_is_geometric_and_ends_on_the_amount() -> None:
    s = sparsity_schedule(0.9, 3)
    kept = [1 - x for x in s]
    assert s[-1] == 0.9
    assert kept[1] / kept[0] == pytest.approx(kept[0]) == pytest.approx(0.1 ** (1 / 3))
    assert sparsity_schedule(0.5, 1) == [0.5]


def test_remove_leaves_plain_weights_and_no_hooks() -> None:
    net = _net()
    keys = sorted(net.state_dict())
    prune_unstructured(net, 0.5)
    assert any(k.endswith("weight_orig") for k in net.state_dict())
    x = torch.randn(4, 3, 6, 6)
    masked_out = net(x)
    make_permanent(net)
    assert sorted(net.state_dict()) == keys
    for m in net.modules():
        assert not m._forward_pre_hooks
        assert not any(n.endswith(("_orig", "_mask")) for n, _ in m.named_parameters())
        assert not any(n.endswith("_mask") for n, _ in m.named_buffers())
    assert all(isinstance(m.weight, nn.Parameter) for _, m in prunable_layers(net))
    torch.testing.assert_close(net(x), masked_out)
    assert sparsity(net)["total"]["sparsity"] == pytest.approx(0.5, abs=1e-2)


def test_prune_model_cycles_are_exact_and_permanent() -> None:
    net = _net()
    out = prune_model(net, PruneSpec(0.8, cycles=3, method="random", scope="global"))
    total = sum(m.weight.numel() for _, m in prunable_layers(net))
    assert out.notes["sparsity"]["total"]["zeros"] == round(0.8 * total)
    assert [c["target"] for c in out.notes["cycles"]][-1] == 0.8
    assert out.method == "prune" and out.module is net
    assert not any(k.endswith(("_orig", "_mask")) for k in net.state_dict())


def test_tied_weights_are_left_alone() -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, nn.Linear(4, 4), head)
    assert [n for n, _ in prunable_layers(net)] == ["1"]
    prune_unstructured(net, 0.5)
    make_permanent(net)
    assert net[2].weight is net[0].weight


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount": 1.0}, r"--amount must be a fraction in \[0, 1\), got 1.0"),
        ({"amount": -0.1}, r"in \[0, 1\), got -0.1"),
        ({"amount": True}, r"in \[0, 1\), got True"),
        ({"amount": 0.5, "method": "l3"}, "unknown unstructured pruning method 'l3'; allowed: l1"),
        ({"amount": 0.5, "method": "l2"}, "allowed: l1, random"),
        ({"amount": 0.5, "structured": True, "method": "x"}, "allowed: l1, l2, random"),
        ({"amount": 0.5, "scope": "local"}, "unknown scope 'local'; allowed: layer, global"),
        ({"amount": 0.5, "structured": True, "scope": "global"}, "use --scope layer"),
        ({"amount": 0.5, "cycles": 0}, "--iterative must be a whole number >= 1, got 0"),
    ],
)
def test_bad_specs_say_what_is_allowed(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruneSpec(**kwargs)  # type: ignore[arg-type]


def test_bad_calls() -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune_unstructured(_net(), 1.5)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        prune_unstructured(nn.Sequential(nn.ReLU()), 0.5)
    net = _net()
    prune_unstructured(net, 0.5)
    with pytest.raises(ValueError, match="already carries pruning masks"):
        prune_model(net, PruneSpec(0.5))
    with pytest.raises(ValueError, match="without fine-tuning"):
        prune_model(_net(), PruneSpec(0.5), initial=_net().state_dict())


def test_rewind_resets_survivors_and_keeps_the_mask() -> None:
    start = {k: v.clone() for k, v in _net().state_dict().items()}
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # "trained"
    prune_unstructured(net, 0.5)
    mask = {n: m.weight_mask.clone() for n, m in prunable_layers(net)}
    rewind_(net, start)
    for n, m in prunable_layers(net):
        torch.testing.assert_close(m.weight_orig, start[f"{n}.weight"], rtol=0, atol=0)
        torch.testing.assert_close(m.bias, start[f"{n}.bias"], rtol=0, atol=0)
        assert torch.equal(m.weight_mask, mask[n])
    net(torch.randn(1, 3, 6, 6))  # the pre-hook recomputes weight = weight_orig * mask
    for n, m in prunable_layers(net):
        torch.testing.assert_close(m.weight, start[f"{n}.weight"] * mask[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot rewind"):
        rewind_(net, {})


def test_initial_state_equals_the_trainers_first_weights(make_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg: Config = make_cfg("train.epochs=1")
    trainer = Trainer(cfg, verbose=False)
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rebuilt = initial_state(trainer.run_dir)
    assert first.keys() == rebuilt.keys()
    for k in first:
        torch.testing.assert_close(rebuilt[k], first[k], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no step"):
        initial_state(trainer.run_dir, source="earliest")
    trainer.fit()
    earliest = initial_state(trainer.run_dir, source="earliest")
    assert not torch.equal(earliest["hidden.0.weight"], first["hidden.0.weight"])
    with pytest.raises(ValueError, match="allowed: init, earliest"):
        initial_state(trainer.run_dir, source="late")


@pytest.mark.slow
def test_finetune_with_the_trainer_keeps_masks_and_saves_plain_keys(
    make_cfg,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    cfg: Config = make_cfg("train.epochs=2", "checkpoint.every_epoch=false")
    data = build_data_for(cfg)
    run = Trainer(cfg, data=data, verbose=False).fit().run_dir
    model = load_model(run)
    tune = trainer_finetune(cfg, data, epochs=1, out_dir=tmp_path / "ft")
    meta = kiln_metadata(cfg, data.info)
    out = prune_model(
        model, PruneSpec(0.6, cycles=2), finetune=tune, initial=initial_state(run), metadata=meta
    )
    # Pruned weights got no update in fine-tuning: exactly round(0.6 * n) zeros per layer.
    for name, m in prunable_layers(model):
        assert int((m.weight == 0).sum()) == round(0.6 * m.weight.numel()), name
    cycles = out.notes["cycles"]
    assert [c["cycle"] for c in cycles] == [1, 2] and out.notes["rewind"]
    assert 0.0 <= cycles[-1]["finetune"]["finetuned"]["acc"] <= 1.0
    # The Trainer's own files carry the masks: they load into the masked model only.
    with safe_open(str(tmp_path / "ft" / "cycle-2" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "hidden.0.weight_orig" in names and "hidden.0.weight_mask" in names
    saved = out.save(tmp_path / "pruned")
    with safe_open(str(saved), "pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())
    x = torch.randn(5, *data.info.input_shape)
    for loaded in (load_model(saved), load_pruned(tmp_path / "pruned")):
        torch.testing.assert_close(loaded(x), model(x))
    assert math.isclose(sparsity(load_model(saved))["total"]["sparsity"], 0.6, abs_tol=1e-3)


def test_recalibrate_bn_matches_the_data_statistics() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(64, 3) * 2 + 1
    assert recalibrate_bn(net, [(x[:32], None), (x[32:], None)])
    assert not net.training
    with torch.no_grad():
        h = net[0](x)
    # momentum=None while re-estimating: the plain average of the batch statistics
    var = (h[:32].var(0) + h[32:].var(0)) / 2
    torch.testing.assert_close(net[1].running_mean, h.mean(0))
    torch.testing.assert_close(net[1].running_var, var)
    assert net[1].momentum == 0.1
    assert not recalibrate_bn(nn.Linear(2, 2), [(x, None)])

"""Unit tests of the small technique objects, each against a hand-computed reference."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import kiln.models
from kiln.algorithms.early_stopping import EarlyStopping
from kiln.algorithms.freezing import Freezer, freeze, frozen_bn_eval, unfreeze
from kiln.algorithms.mixing import BatchMixer
from kiln.algorithms.swa import SWA, recompute_bn
from kiln.config import SchedulerConfig
from kiln.train.schedules import build_scheduler, scale_lrs

# ---------------------------------------------------------------- early stopping


@pytest.mark.parametrize(
    ("mode", "values", "delta", "stops_at"),
    [
        ("min", [1.0, 0.9, 0.95, 0.91], 0.0, 3),  # two validations without a new best
        ("max", [0.5, 0.6, 0.6, 0.59], 0.0, 3),
        ("min", [1.0, 0.99, 0.98, 0.97], 0.05, 2),  # improvements smaller than min_delta
        ("min", [1.0, 0.9, 0.8, 0.7], 0.0, None),
    ],
)
def test_early_stopping_cases(mode, values, delta, stops_at) -> None:
    stop = EarlyStopping(mode=mode, patience=2, min_delta=delta)
    flags = [stop.step(v) for v in values]
    assert flags.index(True) == stops_at if stops_at is not None else not any(flags)


def test_early_stopping_state_round_trip_and_errors() -> None:
    a = EarlyStopping(patience=3)
    for v in (1.0, 2.0):
        a.step(v)
    b = EarlyStopping(patience=3)
    b.load_state_dict(a.state_dict())
    assert (b.best, b.bad) == (1.0, 1)
    with pytest.raises(ValueError, match="mode must be"):
        EarlyStopping(mode="lowest")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


# ---------------------------------------------------------------- freezing


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_freeze_and_unfreeze_by_module_and_glob() -> None:
    net = _net()
    assert freeze(net, ["0", "1.*"]).matched == ("0.bias", "0.weight", "1.bias", "1.weight")
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["2.weight", "2.bias"]
    assert unfreeze(net, ["*.bias"]).matched == ("0.bias", "1.bias", "2.bias")
    net.train()
    assert frozen_bn_eval(net) == []  # the BN bias is trainable again: stays in train mode
    freeze(net, ["1"])
    assert frozen_bn_eval(net) == ["1"] and not net[1].training and net[0].training


def test_one_freeze_takes_a_string_a_list_or_module_types() -> None:
    assert freeze is kiln.models.freeze and unfreeze is kiln.models.unfreeze
    net = nn.Sequential(OrderedDict(trunk=nn.Linear(4, 4), norm=nn.BatchNorm1d(4)))
    net.add_module("head", nn.Linear(4, 2))
    assert freeze(net, "head").matched == ("head.bias", "head.weight")  # not 'h', 'e', ...
    assert freeze(net, ["trunk", nn.BatchNorm1d]).changed == (
        "norm.bias",
        "norm.weight",
        "trunk.bias",
        "trunk.weight",
    )
    assert not any(p.requires_grad for p in net.parameters())
    assert unfreeze(net, "trunk").changed == ("trunk.bias", "trunk.weight")
    f = Freezer("head", {1: "head"})  # one pattern as a string here too
    f.apply(net, 0)
    assert not net.head.weight.requires_grad
    f.apply(net, 1)
    assert net.head.weight.requires_grad
    with pytest.raises(ValueError, match=r"'heda' matches no parameter.*did you mean 'head'"):
        freeze(net, "heda")


def test_frozen_parameters_get_no_gradient() -> None:
    net = _net()
    freeze(net, ["0"])
    net(torch.randn(8, 4)).sum().backward()
    assert net[0].weight.grad is None and net[2].weight.grad is not None


def test_freezer_schedule_is_a_function_of_the_epoch() -> None:
    net = _net()
    f = Freezer(["0", "1"], {1: ["1"], 3: ["0"]})
    assert f.dynamic
    f.apply(net, 0)
    assert not net[0].weight.requires_grad and not net[1].weight.requires_grad
    assert f.apply(net, 1) == ["1.weight", "1.bias"]
    f.apply(net, 3)
    assert all(p.requires_grad for p in net.parameters())
    # jumping straight to an epoch (resume) gives the same state as walking there
    fresh = _net()
    f.apply(fresh, 2)
    assert [p.requires_grad for p in fresh.parameters()] == [False, False, True, True, True, True]


def test_freeze_pattern_without_match_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"matches no parameter.*top-level modules: 0, 1, 2"):
        Freezer(["backbone"]).check(_net())


# ---------------------------------------------------------------- SWA


def test_swa_average_is_the_mean_of_the_weights() -> None:
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    swa = SWA(net, start_epoch=1, swa_lr=0.05, anneal_epochs=0)
    seen = []
    for epoch in range(4):
        swa.begin_epoch(opt, epoch)
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        opt.step()  # (no grads: a no-op, but the order schedulers expect)
        if swa.active(epoch):
            seen.append(net.weight.detach().clone())
        swa.end_epoch(net, epoch)
    assert swa.n_averaged == 3
    torch.testing.assert_close(swa.result().weight, torch.stack(seen).mean(0))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_recompute_bn_uses_the_data() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    x = torch.randn(64, 2) * 3 + 5
    assert recompute_bn(net, [(x[:32], None), (x[32:], None)])
    expect = (net[0](x[:32]).mean(0) + net[0](x[32:]).mean(0)) / 2
    torch.testing.assert_close(net[1].running_mean, expect.detach())
    assert not recompute_bn(nn.Linear(2, 2), [])


# ---------------------------------------------------------------- mixing adapter


def test_batch_mixer_prob_zero_passes_batches_through() -> None:
    mixer = BatchMixer(3, mixup_alpha=0.4, prob=0.0)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    out_x, out_y = mixer(x, y, epoch=0)
    assert out_x is x and out_y is y


def test_batch_mixer_resumes_its_random_stream() -> None:
    a = BatchMixer(3, mixup_alpha=0.4, cutmix_alpha=1.0, seed=3)
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    a(x, y, epoch=0)
    b = BatchMixer(3, mixup_alpha=0.4, cutmix_alpha=1.0, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        xa, ya = a(x, y, epoch=0)
        xb, yb = b(x, y, epoch=0)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batch_mixer_switch_prob_picks_cutmix() -> None:
    mixer = BatchMixer(3, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=1.0)
    x = torch.randn(4, 1, 8, 8)
    out, _ = mixer(x, torch.tensor([0, 1, 2, 0]), epoch=0)
    # CutMix copies pixels: every output pixel is one of the batch's input pixels at that spot
    assert all(
        any(torch.equal(out[i, :, r, c], x[j, :, r, c]) for j in range(4))
        for i in range(4)
        for r in range(8)
        for c in range(8)
    )


def test_batch_mixer_off_last_epochs() -> None:
    mixer = BatchMixer(3, mixup_alpha=0.4, off_last_epochs=2, epochs=5)
    assert [mixer.active(e) for e in range(5)] == [True, True, True, False, False]
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        BatchMixer(3)


# ---------------------------------------------------------------- LR scaling (rollback)


def test_scale_lrs_scales_the_rest_of_the_schedule() -> None:
    def run(scale_at: int | None) -> list[float]:
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = build_scheduler(
            opt, SchedulerConfig(name="warmup_cosine", warmup_steps=2), steps_per_epoch=5, epochs=2
        )
        lrs = []
        for step in range(10):
            if step == scale_at:
                scale_lrs(opt, sched, 0.5)
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    plain, scaled = run(None), run(4)
    assert scaled[:4] == plain[:4]
    assert scaled[4:] == pytest.approx([lr * 0.5 for lr in plain[4:]])

"""Model and optimizer state for checkpoints (kiln.train.checkpoint.state), in one process."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kiln.train.checkpoint import CheckpointError
from kiln.train.checkpoint.state import (
    full_state,
    load_full_state,
    load_outside_state,
    outside_model,
    outside_state,
)


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_full_state_round_trip_restores_model_and_optimizer() -> None:
    model, opt = _trained(0)
    # a copy, as torch.save/torch.load give: the dicts share tensors with the live objects
    msd, osd = copy.deepcopy(full_state(model, opt))
    assert sorted(msd) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # keyed by name
    other, other_opt = _trained(1)
    load_full_state(other, other_opt, msd, osd)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (other, other_opt)):  # the next update is the same too
        m(x).square().mean().backward()
        o.step()
    torch.testing.assert_close(model[0].weight, other[0].weight, rtol=0, atol=0)


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys() -> None:
    model, opt = _trained(0)
    msd, _ = full_state(model, opt)
    wider = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(
        CheckpointError, match=r"shape \(saved vs model\): .*0\.weight \(4, 3\) vs \(8, 3\)"
    ):
        load_full_state(wider, None, msd, None)
    with pytest.raises(CheckpointError, match=r"missing: 0\.bias"):
        load_full_state(model, None, {k: v for k, v in msd.items() if k != "0.bias"}, None)


def test_a_loss_group_is_hidden_from_the_model_state_and_saved_by_position() -> None:
    model = nn.Linear(2, 2)
    weights = nn.Parameter(torch.zeros(3))  # a loss's own parameters (learned task weights)
    opt = torch.optim.SGD(
        [{"params": model.parameters()}, {"params": [weights], "name": "loss", "lr": 0.5}],
        lr=0.1,
        momentum=0.9,
    )
    weights.grad = torch.ones(3)
    opt.step()
    with outside_model(opt) as extra:
        assert len(opt.param_groups) == 1 and len(extra) == 1
        assert weights not in opt.state  # its state is hidden too
    assert len(opt.param_groups) == 2 and weights in opt.state  # put back after the context
    saved = outside_state(opt, extra)  # by position, once the model's state is saved
    assert saved[0]["hyper"]["lr"] == 0.5
    torch.testing.assert_close(saved[0]["state"][0]["momentum_buffer"], torch.ones(3))

    fresh_weights = nn.Parameter(torch.zeros(3))
    fresh = torch.optim.SGD(
        [{"params": nn.Linear(2, 2).parameters()}, {"params": [fresh_weights], "name": "loss"}],
        lr=0.1,
        momentum=0.9,
    )
    with outside_model(fresh) as extra:
        pass  # the model's state loads here
    load_outside_state(fresh, extra, saved)
    assert fresh.param_groups[1]["lr"] == 0.5
    torch.testing.assert_close(fresh.state[fresh_weights]["momentum_buffer"], torch.ones(3))
    with pytest.raises(ValueError, match="has 2 loss parameter group"):
        load_outside_state(fresh, extra, saved * 2)


def test_without_a_loss_group_nothing_is_hidden() -> None:
    _, opt = _trained(0)
    with outside_model(opt) as extra:
        assert extra == [] and len(opt.param_groups) == 1

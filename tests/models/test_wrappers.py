"""unwrap_model / wrapper_chain: the one way Kiln finds the user's module inside wrappers."""

from __future__ import annotations

import torch
from torch import nn

from kiln.algorithms.activation_checkpointing import (
    apply_activation_checkpointing,
    remove_activation_checkpointing,
)
from kiln.algorithms.ema import EMA
from kiln.models.wrappers import unwrap_model, wrapper_chain


class HasModuleAttribute(nn.Module):
    """A user's model with a child named ``module``: not a wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_every_nesting_of_wrappers_is_peeled() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    compiled = torch.compile(net)  # not called: no compilation happens
    for wrapped in (
        net,
        nn.DataParallel(net),
        compiled,
        torch.compile(nn.DataParallel(net)),
        nn.DataParallel(compiled),
    ):
        assert unwrap_model(wrapped) is net
        assert wrapper_chain(wrapped)[0] is wrapped and wrapper_chain(wrapped)[-1] is net
    assert len(wrapper_chain(nn.DataParallel(compiled))) == 3


def test_a_child_named_module_is_not_a_wrapper() -> None:
    user = HasModuleAttribute()
    assert unwrap_model(user) is user
    assert wrapper_chain(user) == [user]


def test_ema_and_checkpointing_see_the_users_names_through_any_wrapper() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    plain = EMA(net, decay=0.9).state_dict()["shadow"].keys()
    for wrapped in (nn.DataParallel(net), torch.compile(nn.DataParallel(net))):
        assert EMA(wrapped, decay=0.9).state_dict()["shadow"].keys() == plain
        assert apply_activation_checkpointing(wrapped, ["0"]) == ["0"]
        assert remove_activation_checkpointing(wrapped) == ["0"]

"""AutoMicrobatch alone: shrink, replay with the group's RNG, drop the group's losses, give up."""

from __future__ import annotations

import pytest
import torch

from kiln.train.microbatch import AutoMicrobatch, is_out_of_memory


def _oom() -> None:
    torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses: a plain RuntimeError


def test_replay_restores_the_rng_of_the_group_start_and_drops_its_losses() -> None:
    auto = AutoMicrobatch(8, accumulate=2)
    losses = [torch.tensor(9.0)]  # logged before the group: kept
    auto.start_group(len(losses))
    draws: dict[int, list[torch.Tensor]] = {}
    said: list[str] = []
    auto.say = said.append

    def run(i: int, x: torch.Tensor, y: torch.Tensor, micro: int) -> bool:
        draws.setdefault(micro, []).append(torch.rand(3))  # dropout's draw, say
        losses.append(torch.tensor(float(i)))
        return i == 1

    for i in range(2):
        auto.add(i, torch.zeros(8, 2), torch.zeros(8))
        run(i, *auto.group[-1][1:], 1)
    dropped = []
    micro, update = auto.shrink_and_replay(1, run, drop=lambda: dropped.append(1), losses=losses)
    assert (micro, update, dropped) == (2, True, [1])
    assert [t.item() for t in losses] == [9.0, 0.0, 1.0]  # the first try's losses are gone
    for a, b in zip(draws[1], draws[2], strict=True):
        assert torch.equal(a, b)  # the same random numbers as the first try
    assert said == [
        "out of memory at micro-batch 8: continuing with micro-batch 4 x 4 "
        "accumulation (same effective batch)"
    ]


def test_keeps_halving_until_it_fits_and_gives_up_at_one_example() -> None:
    auto = AutoMicrobatch(4, accumulate=1)
    auto.start_group(0)
    auto.add(0, torch.zeros(4, 2), torch.zeros(4))
    tried: list[int] = []

    def fits_at_4(i: int, x: torch.Tensor, y: torch.Tensor, micro: int) -> bool:
        tried.append(micro)
        if micro < 4:
            _oom()
        return True

    assert auto.shrink_and_replay(1, fits_at_4, drop=lambda: None, losses=[]) == (4, True)
    assert tried == [2, 4]

    def never(i: int, x: torch.Tensor, y: torch.Tensor, micro: int) -> bool:
        _oom()
        return True

    with pytest.raises(RuntimeError, match="even with a micro-batch of 1"):
        auto.shrink_and_replay(1, never, drop=lambda: None, losses=[])


def test_another_error_during_the_replay_is_not_swallowed() -> None:
    auto = AutoMicrobatch(4, accumulate=1)
    auto.start_group(0)
    auto.add(0, torch.zeros(4, 2), torch.zeros(4))

    def broken(i: int, x: torch.Tensor, y: torch.Tensor, micro: int) -> bool:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        auto.shrink_and_replay(1, broken, drop=lambda: None, losses=[])
    assert not is_out_of_memory(RuntimeError("shapes"))

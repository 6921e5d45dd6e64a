"""The accumulation schedule, decided once (kiln.train.accumulation) and applied by the Engine.

Reference: a brute-force enumeration of the groups of a pass (consecutive runs of ``k``
micro-steps, the last one possibly shorter), against which the Engine's questions
(``is_update``, ``starts_group``, ``group_size``, ``updates_per_pass``) are checked; and a loader
batch split into pieces (``last_piece=False`` on all but the last) trains exactly like the
unsplit batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.train import accumulation
from kiln.train.engine import Engine


def _groups(n: int, k: int) -> list[list[int]]:
    return [list(range(s, min(s + k, n))) for s in range(0, n, k)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 12, 13])
def test_schedule_matches_the_enumerated_groups(n: int, k: int) -> None:
    engine = Engine(device="cpu", accumulate=k)
    groups = _groups(n, k)
    assert engine.updates_per_pass(n) == len(groups)
    for group in groups:
        for i in group:
            assert engine.is_update(i, n) == (i == group[-1])
            assert engine.starts_group(i) == (i == group[0])
            assert engine.group_size(i, n) == len(group)
            assert engine.group_size(i, None) == k
            # unknown length: only full groups end before the caller's flush
            assert engine.is_update(i, None) == ((i + 1) % k == 0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _run(pieces: int, k: int, sizes: list[int]) -> tuple[nn.Module, int]:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(sum(sizes), 5, generator=g), torch.randint(0, 3, (sum(sizes),), generator=g)
    engine = Engine(device="cpu", accumulate=k)
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    start, n = 0, len(sizes)
    for i, s in enumerate(sizes):
        xs, ys = x[start : start + s], y[start : start + s]
        parts = list(zip(xs.tensor_split(pieces), ys.tensor_split(pieces), strict=True))
        parts = [(a, b) for a, b in parts if len(a)]
        for j, (xb, yb) in enumerate(parts):
            last = j == len(parts) - 1
            with engine.micro_step(i, n, size=len(xb), last_piece=last) as update:
                engine.backward(nn.functional.cross_entropy(model(xb), yb))
            assert update == (last and engine.is_update(i, n))
        if engine.is_update(i, n):
            engine.optimizer_step(opt)
        start += s
    assert engine.pending == 0
    return model, engine.updates


@pytest.mark.parametrize(("k", "sizes"), [(1, [8, 8, 5]), (2, [8, 8, 8, 8, 3]), (3, [6] * 7)])
def test_split_batches_train_like_the_unsplit_ones(k: int, sizes: list[int]) -> None:
    ref, ref_updates = _run(1, k, sizes)
    for pieces in (2, 3):
        model, updates = _run(pieces, k, sizes)
        assert updates == ref_updates == accumulation.updates_per_pass(len(sizes), k)
        torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-6)

"""The train step alone: one update equals a hand-written loop's, in the documented order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kiln.data.loader import start_epoch
from kiln.train.build import build_parts
from kiln.train.step import epoch_schedule, mean_loss, train_step


@pytest.fixture
def make_parts(make_cfg):
    def make(*overrides: str):
        base = ("model.kwargs.hidden=[8]", "optim.name=sgd", "optim.weight_decay=0")
        return build_parts(make_cfg(*base, *overrides), None, None)

    return make


class Sched:
    """An LR schedule that records its steps."""

    def __init__(self, interval: str, on_step=None) -> None:
        self.interval, self.calls, self.on_step = interval, [], on_step

    def step(self, *args: float) -> None:
        self.calls.append(args)
        if self.on_step is not None:
            self.on_step()


def _batches(parts):
    start_epoch(parts.train_loader, 0, 0)
    return list(enumerate(parts.train_loader))


def test_one_update_over_an_accumulation_group_equals_a_plain_loop(make_parts) -> None:
    parts = make_parts("train.accumulate=2")
    model = parts.engine.model
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=parts.optimizer.param_groups[0]["lr"])
    batches = _batches(parts)
    losses: list[torch.Tensor] = []
    result = train_step(parts, iter(batches), losses, epoch=0, step=0)
    assert result is not None and result.finite and (result.batch, result.micro) == (2, 1)
    assert len(losses) == 2 and parts.engine.updates == 1
    (_, (x0, y0)), (_, (x1, y1)) = batches[:2]
    total = F.cross_entropy(ref(x0), y0, reduction="sum") + F.cross_entropy(
        ref(x1), y1, reduction="sum"
    )
    (total / (len(x0) + len(x1))).backward()  # the mean over the group's samples
    ref_opt.step()
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=k)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_phases_come_in_order_and_the_schedule_steps_on_updates_only(make_parts) -> None:
    parts = make_parts("train.accumulate=2")
    laps: list[str] = []
    steps: list[int] = []
    train_step(
        parts,
        iter(_batches(parts)),
        [],
        epoch=0,
        step=0,
        schedule=Sched("step", lambda: steps.append(parts.engine.updates)),
        lap=laps.append,
    )
    one_batch = ["data", "to_device", "forward", "backward"]
    assert laps == [*one_batch, *one_batch, "syncs", "optimizer"]
    assert steps == [1]  # once, after the optimizer's update


def test_a_nonfinite_group_is_reported_and_not_applied(make_parts) -> None:
    parts = make_parts()
    model = parts.engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (i, (x, y)), *_ = _batches(parts)
    bad = [(i, (torch.full_like(x, float("nan")), y))]
    result = train_step(parts, iter(bad), [], epoch=0, step=0)
    assert result is not None and not result.finite and result.batch == 1
    assert torch.isnan(result.x).all()  # for the diagnosis
    assert parts.engine.updates == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(p.grad is not None for p in model.parameters())  # the policy decides


def test_without_the_guard_nothing_is_read_and_nan_goes_through(make_parts) -> None:
    parts = make_parts()
    (i, (x, y)), *_ = _batches(parts)
    laps: list[str] = []
    bad = [(i, (torch.full_like(x, float("nan")), y))]
    result = train_step(parts, iter(bad), [], epoch=0, step=0, guard=False, lap=laps.append)
    assert result is not None and result.finite and "syncs" not in laps
    assert parts.engine.updates == 1


def test_no_batches_left_is_none_and_a_split_batch_gives_the_same_update(make_parts) -> None:
    whole, split = make_parts(), make_parts()
    assert train_step(whole, iter([]), [], epoch=0, step=0) is None
    batches = _batches(whole)[:1]
    train_step(whole, iter(batches), [], epoch=0, step=0, grad_norm=True)
    losses: list[torch.Tensor] = []
    result = train_step(split, iter(batches), losses, epoch=0, step=0, micro=4)
    assert result is not None and result.micro == 4 and len(losses) == 4
    a, b = whole.engine.model.state_dict(), split.engine.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_ema_updates_on_its_cadence(make_parts) -> None:
    parts = make_parts("ema.enabled=true", "ema.every=2")
    ema = parts.tech.ema
    batches = iter(_batches(parts))
    train_step(parts, batches, [], epoch=0, step=0)  # update 1: not on the cadence
    assert ema.num_updates == 0
    train_step(parts, batches, [], epoch=0, step=1)  # update 2
    assert ema.num_updates == 1


def test_epoch_schedule_and_mean_loss() -> None:
    per_epoch, plateau, per_update = Sched("epoch"), Sched("plateau"), Sched("step")
    for s in (per_epoch, plateau, per_update):
        epoch_schedule(s, {"loss": 0.3}, "val/loss")
    epoch_schedule(plateau, {}, "val/loss")  # no validation this epoch: no plateau step
    epoch_schedule(None, {}, "val/loss")
    assert (per_epoch.calls, plateau.calls, per_update.calls) == ([()], [(0.3,)], [])
    assert mean_loss([torch.tensor(1.0), torch.tensor(4.0)]) == 2.5

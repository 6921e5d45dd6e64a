"""optimizer_step(skip_nonfinite=True): a non-finite update is skipped exactly, without host syncs.

Reference: the same run that simply leaves out the bad batch (no backward, no step). Parameters
and optimizer state must be bit-identical, for fused optimizers (the flag goes into the kernel)
and for those that cannot take it (the flag is read on the host).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from kiln.train.engine import Engine
from kiln.train.found_inf import FoundInf

BAD = 2  # the batch whose loss is NaN


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)
    ]


OPTIMIZERS: dict[str, Any] = {
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "sgd-plain-fused": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "adam-default": lambda p: torch.optim.Adam(p, lr=0.01),
}


def _run(make_opt: Any, bad: int | None, *, guard: bool, clip: float | None = None) -> Any:
    engine = Engine(device="cpu", clip_norm=clip)
    model, _ = engine.setup(_model())
    opt = make_opt(model.parameters())
    for i, (x, y) in enumerate(_batches()):
        if i == bad and not guard:
            continue  # the reference leaves the bad batch out
        with engine.micro_step(0, 1):
            loss = nn.functional.cross_entropy(model(x), y)
            engine.backward(loss * float("nan") if i == bad else loss)
        engine.optimizer_step(opt, skip_nonfinite=guard)
    return engine, model, opt


def _assert_same(a: Any, b: Any) -> None:
    (_, ma, oa), (_, mb, ob) = a, b
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for name, v in sa[key].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[key][name])), (key, name)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [0, BAD], ids=["first-step", "later-step"])
def test_skipped_update_equals_leaving_the_batch_out(name: str, bad: int) -> None:
    guarded = _run(OPTIMIZERS[name], bad, guard=True)
    _assert_same(guarded, _run(OPTIMIZERS[name], bad, guard=False))
    engine = guarded[0]
    assert engine.nonfinite_skips() == 1
    assert all(torch.isfinite(p).all() for p in guarded[1].parameters())


def test_finite_run_is_unchanged_by_the_guard() -> None:
    for make in OPTIMIZERS.values():
        _assert_same(_run(make, None, guard=True), _run(make, None, guard=False))


def test_the_flag_is_taken_before_clipping() -> None:
    # clip_grad_norm_ of a NaN norm scales every gradient by NaN: the check must come first
    guarded = _run(OPTIMIZERS["sgd-fused"], BAD, guard=True, clip=0.5)
    _assert_same(guarded, _run(OPTIMIZERS["sgd-fused"], BAD, guard=False, clip=0.5))


def test_fused_steps_make_no_host_sync(monkeypatch) -> None:
    engine = Engine(device="cpu")
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    batches = _batches()

    def step(i: int) -> None:
        x, y = batches[i]
        with engine.micro_step(0, 1):
            loss = nn.functional.cross_entropy(model(x), y)
            engine.backward(loss * float("nan") if i == BAD else loss)
        engine.optimizer_step(opt, skip_nonfinite=True)

    step(0)  # the first step of each parameter is read on the host (its state is created)

    def sync(*args: Any) -> Any:
        raise AssertionError("host sync in a guarded fused step")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", sync)
        m.setattr(torch.Tensor, "item", sync)
        for i in range(1, len(batches)):
            step(i)
    assert engine.nonfinite_skips() == 1
    assert engine.updates == len(batches)  # skipped-on-device steps count until read


def test_non_fused_optimizer_reads_the_flag(monkeypatch) -> None:
    guard = FoundInf(torch.device("cpu"))
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=True)
    assert not guard.can_skip_on_device(opt)
    fused = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    assert not guard.can_skip_on_device(fused)  # no momentum buffer yet: first step on the host
    p.grad = torch.ones(3)
    fused.step()
    assert guard.can_skip_on_device(fused)


def test_count_survives_state_dict() -> None:
    engine = _run(OPTIMIZERS["sgd-fused"], BAD, guard=True)[0]
    other = Engine(device="cpu")
    other.load_state_dict(copy.deepcopy(engine.state_dict()))
    assert other.nonfinite_skips() == 1


def test_flag_is_cleared_between_checks() -> None:
    # the flag is zeroed only when it may hold a 1: a bad check must not leak into the next
    engine = Engine(device="cpu")
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    seen = []
    for i, bad in enumerate([False, True, False, False, True, True, False]):
        x, y = _batches()[i % 6]
        with engine.micro_step(0, 1):
            loss = nn.functional.cross_entropy(model(x), y)
            engine.backward(loss * float("nan") if bad else loss)
        seen.append(engine.grads_finite(opt))
        if i == 0:  # a real step: the optimizer's state exists, later skips run on the device
            engine.optimizer_step(opt, skip_nonfinite=True)
        elif i == 2:  # a device-side skip of NaN grads sets the flag without a host read
            for p in model.parameters():
                p.grad = torch.full_like(p, float("nan"))
            assert engine._found_inf.can_skip_on_device(opt)
            engine.optimizer_step(opt, skip_nonfinite=True)
        else:
            engine.zero_grad(opt)
    assert seen == [True, False, True, True, False, False, True]

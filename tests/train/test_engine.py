"""Engine: accumulation equals one big batch, clipping after unscale, fp16 policy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kiln.train.engine import Engine
from kiln.train.evaluation import accumulation_weights


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train_big_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = 0
    for s in sizes:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[start : start + s]), y[start : start + s]).backward()
        opt.step()
        start += s
    return len(sizes)


@pytest.mark.parametrize(
    ("n", "micro", "k", "big_sizes"),
    [
        (48, 4, 4, [16, 16, 16]),  # full groups
        (40, 4, 4, [16, 16, 8]),  # partial last group: 2 micro-batches
        (38, 4, 4, [16, 16, 6]),  # partial group whose last micro-batch is short too
    ],
)
def test_accumulation_equals_one_big_batch(
    n: int, micro: int, k: int, big_sizes: list[int]
) -> None:
    x, y = _data(n)
    ref = _model()
    _train_big_batches(ref, x, y, big_sizes)

    model = _model()
    engine = Engine(device="cpu", accumulate=k)
    model, _ = engine.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    steps = {"opt": 0}
    opt.register_step_post_hook(lambda *a: steps.__setitem__("opt", steps["opt"] + 1))
    sizes = [min(micro, n - s) for s in range(0, n, micro)]
    weights = accumulation_weights(sizes, k)
    start = 0
    for i, s in enumerate(sizes):
        with engine.micro_step(i, len(sizes), weight=weights[i]) as update:
            with engine.autocast():
                loss = nn.functional.cross_entropy(
                    model(x[start : start + s]), y[start : start + s]
                )
            engine.backward(loss)
        start += s
        if update:
            engine.optimizer_step(opt)
            sched.step()
    torch.testing.assert_close(model.state_dict(), ref.state_dict())
    assert engine.updates == steps["opt"] == len(big_sizes)
    assert sched.last_epoch == len(big_sizes)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)


def test_default_weight_divides_by_group_size() -> None:
    engine = Engine(device="cpu", accumulate=4)
    assert [engine.group_size(i, 10) for i in range(10)] == [4] * 8 + [2, 2]
    assert [engine.is_update(i, 10) for i in range(10)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
        True,
    ]
    assert accumulation_weights([4, 4, 4, 4, 4, 2], 4) == [0.25] * 4 + [4 / 6, 2 / 6]


def test_fp16_scaler_clipping_equals_clipping_unscaled_grads() -> None:
    x, y = _data(32)
    plain, scaled = _model(), _model()
    with pytest.warns(RuntimeWarning, match="100x slower"):
        engine16 = Engine(device="cpu", precision="fp16", clip_norm=0.05, allow_fp16_cpu=True)
    engine32 = Engine(device="cpu", precision="fp32", clip_norm=0.05)
    assert engine16.precision.scaler is not None and engine16.precision.scaler.get_scale() > 1
    results = []
    for engine, model in ((engine32, plain), (engine16, scaled)):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        norms = []
        for _ in range(3):
            with engine.micro_step(0, 1):
                loss = nn.functional.cross_entropy(model(x), y)  # fp32 forward: scaler math only
                engine.backward(loss)
            norms.append(engine.optimizer_step(opt))
        results.append((model.state_dict(), norms))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(torch.stack(results[1][1]), torch.stack(results[0][1]))
    assert all(float(n) > 0.05 for n in results[0][1])  # clipping was active


def test_fp16_scaler_skips_nonfinite_step_and_restores_state() -> None:
    model = _model()
    with pytest.warns(RuntimeWarning):
        engine = Engine(device="cpu", precision="fp16", allow_fp16_cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with engine.micro_step(0, 1):
        engine.backward(model(torch.full((2, 6), float("inf"))).sum())
    engine.optimizer_step(opt)
    torch.testing.assert_close(model.state_dict(), before)
    assert (engine.updates, engine.skipped, engine.last_step_taken) == (0, 1, False)
    state = engine.state_dict()
    with pytest.warns(RuntimeWarning):
        other = Engine(device="cpu", precision="fp16", allow_fp16_cpu=True)
    other.load_state_dict(state)
    assert other.precision.scaler.get_scale() == engine.precision.scaler.get_scale() == 32768.0


def test_fp16_on_cpu_refused_with_reason() -> None:
    with pytest.raises(ValueError, match=r"100x slower.*precision=bf16.*allow_fp16_cpu"):
        Engine(device="cpu", precision="fp16")


def test_bf16_autocast_outputs_bf16_and_grads_fp32() -> None:
    engine = Engine(device="cpu", precision="bf16")
    model, _ = engine.setup(_model())
    with engine.micro_step(0, 1), engine.autocast():
        out = model(torch.randn(4, 6))
    assert out.dtype == torch.bfloat16
    engine.backward(out.float().sum())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert engine.precision.scaler is None


def test_clip_value_clamps_each_element() -> None:
    engine = Engine(device="cpu", clip_value=1e-3)
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with engine.micro_step(0, 1):
        engine.backward(model(torch.randn(8, 6) * 100).pow(2).sum())
    engine.optimizer_step(opt)
    deltas = [(b - p.detach()).abs().max() for b, p in zip(before, model.parameters(), strict=True)]
    assert max(float(d) for d in deltas) <= 1e-3 + 1e-7


def test_bad_engine_arguments() -> None:
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        Engine(device="cpu", accumulate=0)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        Engine(device="cpu", clip_norm=-1.0)

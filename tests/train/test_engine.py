"""Engine: accumulation equals one big batch, clipping after unscale, fp16 policy."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from kiln.errors import UsageError
from kiln.train.accumulation import GroupWeights
from kiln.train.engine import Engine


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


def _engine_run(
    x: torch.Tensor,
    y: torch.Tensor,
    sizes: list[int],
    k: int,
    *,
    known_length: bool = True,
    precision: str = "fp32",
) -> tuple[nn.Module, Engine, int]:
    """Train with the Engine's default weighting; returns the model, engine and update count."""
    if precision == "fp16":
        with pytest.warns(RuntimeWarning, match="100x slower"):
            engine = Engine(device="cpu", accumulate=k, precision="fp16", allow_fp16_cpu=True)
    else:
        engine = Engine(device="cpu", accumulate=k)
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = {"opt": 0}
    opt.register_step_post_hook(lambda *a: steps.__setitem__("opt", steps["opt"] + 1))
    start = 0
    n = len(sizes) if known_length else None
    for i, s in enumerate(sizes):
        xb, yb = engine.to_device((x[start : start + s], y[start : start + s]))
        with engine.micro_step(i, n) as update:
            # fp16: an fp32 forward, so only the scaler's math differs from the reference
            with engine.autocast() if precision != "fp16" else contextlib.nullcontext():
                loss = nn.functional.cross_entropy(model(xb), yb)
            engine.backward(loss)
        start += s
        if update:
            engine.optimizer_step(opt)
    if not known_length:
        assert engine.flush(opt) == (len(sizes) % k != 0)
        assert not engine.flush(opt)  # nothing left: a second flush does nothing
    assert engine.updates == steps["opt"]
    return model, engine, steps["opt"]


@pytest.mark.parametrize(
    ("n", "micro", "k", "big_sizes"),
    [
        (48, 4, 4, [16, 16, 16]),  # full groups
        (40, 4, 4, [16, 16, 8]),  # partial last group: 2 micro-batches
        (38, 4, 4, [16, 16, 6]),  # partial group whose last micro-batch is short too
        (46, 4, 4, [16, 16, 14]),  # full last group whose last micro-batch is short
        (30, 8, 1, [8, 8, 8, 6]),  # no accumulation, short last batch
    ],
)
@pytest.mark.parametrize("known_length", [True, False], ids=["n-known", "flush"])
def test_accumulation_equals_one_big_batch_by_default(
    n: int, micro: int, k: int, big_sizes: list[int], known_length: bool
) -> None:
    """No ``weight=``: the Engine's own weighting equals one big batch (to float rounding)."""
    x, y = _data(n)
    ref = _model()
    _train_big_batches(ref, x, y, big_sizes)
    sizes = [min(micro, n - s) for s in range(0, n, micro)]
    model, engine, updates = _engine_run(x, y, sizes, k, known_length=known_length)
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-6)
    assert updates == len(big_sizes)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    assert engine.pending == 0


def test_accumulation_default_is_exact_under_the_fp16_scaler() -> None:
    x, y = _data(46)
    ref = _model()
    _train_big_batches(ref, x, y, [16, 16, 14])
    model, _, _ = _engine_run(x, y, [4] * 11 + [2], 4, known_length=False, precision="fp16")
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=1e-5, atol=1e-6)


def test_accumulation_explicit_size_and_weight() -> None:
    engine = Engine(device="cpu", accumulate=2)
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(12)
    with engine.micro_step(0, 2, size=8):  # size= wins over what to_device saw
        engine.backward(nn.functional.cross_entropy(model(x[:8]), y[:8]))
    with engine.micro_step(1, 2, size=4):
        engine.backward(nn.functional.cross_entropy(model(x[8:]), y[8:]))
    grads = [p.grad.clone() for p in model.parameters()]
    assert engine._group.correction() == pytest.approx(16 / 12)
    engine.zero_grad(opt)
    nn.functional.cross_entropy(model(x), y).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g * 16 / 12, p.grad)
    model.zero_grad()
    with engine.micro_step(0, 2, weight=0.5):
        engine.backward(model(x).sum())
    with pytest.raises(ValueError, match=r"weight=...\) was given for some micro-batches"):
        engine.micro_step(1, 2)


def test_unflushed_partial_group_is_detected() -> None:
    engine = Engine(device="cpu", accumulate=4)
    model, _ = engine.setup(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(24)
    for i in range(6):  # one update after 4, then 2 micro-batches pending
        with engine.micro_step(i, None) as update:
            engine.backward(nn.functional.cross_entropy(model(x[4 * i : 4 * i + 4]), y[:4]))
        if update:
            engine.optimizer_step(opt)
    assert engine.pending == 2
    with pytest.raises(UsageError, match=r"last 2 micro-batches .* engine.flush\(optimizer\)"):
        engine.micro_step(0, None)
    engine.zero_grad(opt)  # dropping them on purpose is allowed
    with engine.micro_step(0, None):
        pass
    assert engine.pending == 0


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
    weights = GroupWeights(4)
    factors = []
    for size, update in ((4, False), (4, False), (4, False), (4, True)):
        factors.append(weights.factor(size, update=update))
        weights.backward()
    assert factors == [0.25] * 4 and weights.correction() == 1.0  # full groups: exactly 1/k
    weights.reset()
    factors = []
    for size, update in ((4, False), (2, True)):
        factors.append(weights.factor(size, update=update, planned=2))
        weights.backward()
    assert factors == [0.5, 0.25] and weights.correction() == 8 / 6


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

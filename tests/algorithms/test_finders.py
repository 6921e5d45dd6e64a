"""LR range test and batch-size finder: curve shape, exact restore, plot, OOM and budget search."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kiln.algorithms.finders import (
    BatchSizeError,
    batch_find,
    lr_find,
    peak_step_memory,
    preserved,
    suggest_lr,
)
from kiln.train.engine import Engine

ce = nn.functional.cross_entropy


def _problem(n_batches: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two separable Gaussian blobs in 8-D: learnable in a few dozen steps at a good LR."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 2, (32,), generator=g)
        x = torch.randn(32, 8, generator=g) + 1.5 * (2 * y[:, None] - 1)
        out.append((x, y))
    return out


def _model(seed: int = 0, dropout: float = 0.0, norm: bool = True) -> nn.Module:
    """A small MLP; BatchNorm (buffers to restore) makes it LR-scale invariant, so not always."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.BatchNorm1d(32) if norm else nn.Identity(),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, 2),
    )


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optim": copy.deepcopy(opt.state_dict()),  # state_dict() aliases the live tensors
        "modes": [m.training for m in model.modules()],
        "params": list(model.parameters()),
    }


def _assert_bit_identical(before: Any, after: Any) -> None:
    """Equal values, dtypes and structure: no tolerance."""
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor)
        assert before.dtype == after.dtype and before.shape == after.shape
        assert torch.equal(before, after)
    elif isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys()
        for k in before:
            _assert_bit_identical(before[k], after[k])
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after)
        for a, b in zip(before, after, strict=True):
            _assert_bit_identical(a, b)
    else:
        assert before == after


def _trained(opt_cls: type[torch.optim.Optimizer], **kw: Any) -> tuple[nn.Module, Any]:
    """A model and optimizer a few steps into training, with gradients left in place."""
    model = _model(dropout=0.2)
    opt = opt_cls(model.parameters(), **kw)
    for x, y in _problem(3, seed=1):
        ce(model(x), y).backward()
        opt.step()
    ce(model(x), y).backward()  # leftover gradients must come back too
    return model, opt


# --------------------------------------------------------------------------- LR finder


def test_lrs_are_exactly_geometric_and_loader_is_cycled() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _problem(3)  # shorter than the sweep: started again
    r = lr_find(model, opt, data, ce, start_lr=1e-6, end_lr=1e-3, num_steps=10)
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) == 10
    assert not r.stopped_early
    q = (1e-3 / 1e-6) ** (1 / 9)
    expected = torch.tensor([1e-6 * q**i for i in range(10)], dtype=torch.float64)
    torch.testing.assert_close(
        torch.tensor(r.lrs, dtype=torch.float64), expected, rtol=1e-14, atol=0
    )
    ratios = [b / a for a, b in zip(r.lrs, r.lrs[1:], strict=False)]
    assert max(ratios) - min(ratios) < 1e-12
    assert r.lrs[0] == 1e-6 and math.isclose(r.lrs[-1], 1e-3, rel_tol=1e-14)


def test_smoothing_is_bias_corrected_ema() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    beta = 0.9
    r = lr_find(model, opt, _problem(), ce, end_lr=1e-4, num_steps=6, smoothing=beta)
    avg = 0.0
    for i, (loss, smooth) in enumerate(zip(r.losses, r.smoothed, strict=True)):
        avg = beta * avg + (1 - beta) * loss
        assert math.isclose(smooth, avg / (1 - beta ** (i + 1)), rel_tol=1e-12)
    assert r.smoothed[0] == pytest.approx(r.losses[0])  # bias correction: no pull toward 0


def _regression(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A noisy linear target: plain SGD on it diverges once the LR passes ~2 / curvature."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    xs = [torch.randn(32, 8, generator=g) for _ in range(4)]
    return [(x, x @ w + 0.1 * torch.randn(32, 1, generator=g)) for x in xs]


def test_curve_shape_suggestion_and_early_stop_on_divergence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mse = nn.functional.mse_loss
    r = lr_find(model, opt, _regression(), mse, start_lr=1e-5, end_lr=1e4, num_steps=80)
    assert r.stopped_early and len(r.lrs) < 60  # LR 1e4 is never reached: it blew up before
    diverged_at = r.lrs[-1]
    # It stopped right after the first step whose smoothed loss passed 4x the best so far.
    assert r.smoothed[-1] > 4.0 * min(r.smoothed)
    assert all(v <= 4.0 * min(r.smoothed[: i + 1]) for i, v in enumerate(r.smoothed[:-1]))
    assert all(math.isfinite(v) for v in r.losses)
    # The loss first falls well below its start (learning), then rises (divergence).
    i_min = r.smoothed.index(min(r.smoothed[8:]))  # lr_find skips the first 10% of steps
    assert r.smoothed[i_min] < 0.8 * r.smoothed[0]
    assert 8 < i_min < len(r.lrs) - 1
    assert r.suggestion is not None
    assert 1e-5 < r.suggestion < diverged_at
    assert r.suggestion <= r.lrs[i_min] == r.lr_at_min
    assert r.suggestion >= 1e-2  # below ~1e-2 this problem barely moves in 80 steps


def test_non_finite_loss_stops_without_recording_it() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = ce(out, y)
        return loss * math.inf if calls["n"] == 5 else loss

    r = lr_find(model, opt, _problem(), loss_fn, num_steps=20)
    assert r.stopped_early and len(r.losses) == 4
    assert all(math.isfinite(v) for v in r.losses + r.smoothed)


def test_param_groups_keep_their_lr_ratio_during_the_sweep() -> None:
    model = _model()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 1.0},
            {"params": model[4].parameters(), "lr": 0.1},
        ],
        lr=1.0,
    )
    seen: list[list[float]] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append([g["lr"] for g in opt.param_groups])
        return ce(out, y)

    r = lr_find(model, opt, _problem(), loss_fn, end_lr=1e-3, num_steps=5)
    assert [s[0] for s in seen] == r.lrs
    for lr0, lr1 in seen:
        assert lr1 == pytest.approx(0.1 * lr0, rel=1e-12)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.1]  # restored


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
        (torch.optim.AdamW, {"lr": 1e-3, "fused": True}),  # what build_optimizer picks on CPU
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ],
)
def test_restore_is_bit_exact(opt_cls: type[torch.optim.Optimizer], kw: Any) -> None:
    model, opt = _trained(opt_cls, **kw)
    model.eval()  # a non-default mode must come back too
    before = _snapshot(model, opt)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    r = lr_find(model, opt, _problem(), ce, num_steps=15, end_lr=100.0)
    assert len(r.lrs) > 3
    after = _snapshot(model, opt)
    assert all(a is b for a, b in zip(before.pop("params"), after.pop("params"), strict=True))
    _assert_bit_identical(before, after)
    assert torch.equal(torch.get_rng_state(), rng)
    # The optimizer still drives the same parameters: one more step changes them.
    ce(model(_problem(1)[0][0]), _problem(1)[0][1]).backward()
    opt.step()
    assert not torch.equal(model[0].weight, before["state"]["0.weight"])


def test_finder_before_training_leaves_the_training_run_unchanged() -> None:
    def train(find_first: bool) -> torch.Tensor:
        model = _model(dropout=0.3)  # dropout draws from the global RNG
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(7)
        if find_first:
            lr_find(model, opt, _problem(), ce, num_steps=10)
        for x, y in _problem(3, seed=2):
            ce(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(False), train(True))


def test_engine_path_restores_engine_counters() -> None:
    engine = Engine(device="cpu", precision="bf16", clip_norm=1.0)
    model, _ = engine.setup(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = _snapshot(model, opt)
    r = lr_find(model, opt, _problem(), ce, num_steps=12, engine=engine)
    assert len(r.lrs) == 12 and all(math.isfinite(v) for v in r.losses)
    assert engine.updates == 0 and engine.skipped == 0
    after = _snapshot(model, opt)
    before.pop("params"), after.pop("params")
    _assert_bit_identical(before, after)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = lr_find(model, opt, _problem(), ce, num_steps=20, end_lr=1e3)
    path = r.plot(tmp_path / "sub" / "lr.png")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.to_dict()["suggestion"] == r.suggestion


def test_suggest_lr_reference_curve() -> None:
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]  # 1e-6 .. 1
    # A logistic drop centred at 1e-3 in log10(lr), then a blow-up past 1e-1.
    loss = [2 / (1 + math.exp(3 * (math.log10(lr) + 3))) + 0.1 for lr in lrs]
    loss = [v + (50 * (lr - 0.1) if lr > 0.1 else 0) for v, lr in zip(loss, lrs, strict=True)]
    assert suggest_lr(lrs, loss) == pytest.approx(1e-3)
    assert suggest_lr(lrs, loss, window=3) == pytest.approx(1e-3)
    noisy = [v + (1.0 if i == 2 else 0.0) for i, v in enumerate(loss)]  # a spike at the start
    assert suggest_lr(lrs, noisy) == pytest.approx(lrs[3])  # the spike's fall wins ...
    assert suggest_lr(lrs, noisy, skip_start=4) == pytest.approx(1e-3)  # ... unless skipped
    flat = [1.0] * 10  # never falls: min rule (first minimum / 10)
    assert suggest_lr(lrs[:10], flat) == pytest.approx(lrs[0] / 10)
    assert suggest_lr([], []) is None


def test_bad_arguments_are_refused() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        lr_find(model, opt, _problem(), ce, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        lr_find(model, opt, _problem(), ce, num_steps=1)
    with pytest.raises(ValueError, match="no batch"):
        lr_find(model, opt, [], ce)


def test_preserved_restores_even_when_the_block_raises() -> None:
    model, opt = _trained(torch.optim.AdamW, lr=1e-2)
    before = _snapshot(model, opt)
    with pytest.raises(KeyError), preserved(model, opt):
        ce(model(_problem(1)[0][0]), _problem(1)[0][1]).backward()
        opt.step()
        raise KeyError("boom")
    after = _snapshot(model, opt)
    before.pop("params"), after.pop("params")
    _assert_bit_identical(before, after)


# --------------------------------------------------------------------------- batch finder


def _make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def _oom_above(limit: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: batch > {limit})")

    return hook


@pytest.mark.parametrize(("mode", "expected"), [("power", 32), ("binary", 48)])
def test_injected_oom_power_and_binary(mode: str, expected: int) -> None:
    model = _model(norm=False, dropout=0.5)
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = _snapshot(model, opt)
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    handle = model.register_forward_pre_hook(_oom_above(48))
    r = batch_find(model, opt, _make_batch, ce, mode=mode, max_batch=1024)  # type: ignore[arg-type]
    handle.remove()
    assert r.batch_size == expected
    assert len(modes) == len(r.trials) and all(modes)  # every trial trains; eval comes back
    sizes = [t.batch_size for t in r.trials]
    assert sizes[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert r.trials[6].reason == "out of memory" and r.trials[6].peak_bytes is None
    if mode == "binary":
        assert sizes[7:] == [48, 56, 52, 50, 49]
    after = _snapshot(model, opt)
    before.pop("params"), after.pop("params")
    _assert_bit_identical(before, after)


def test_cpu_allocator_failure_counts_as_oom() -> None:
    model = _model(norm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].shape[0] > 5:
            torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's own RuntimeError

    model.register_forward_pre_hook(hook)
    r = batch_find(model, opt, _make_batch, ce, mode="binary", max_batch=64)
    assert r.batch_size == 5


def test_other_errors_are_not_swallowed() -> None:
    model = _model(norm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].shape[0] > 4:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model.register_forward_pre_hook(hook)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        batch_find(model, opt, _make_batch, ce, max_batch=64)


def test_even_batch_one_failing_is_a_clear_error() -> None:
    model = _model(norm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.register_forward_pre_hook(_oom_above(0))
    with pytest.raises(BatchSizeError, match=r"not even batch size 1 fits.*out of memory"):
        batch_find(model, opt, _make_batch, ce, max_batch=64)
    with pytest.raises(BatchSizeError, match="over the budget of"):
        batch_find(_model(norm=False), opt, _make_batch, ce, max_batch=64, budget_bytes=1)


def test_cpu_peak_grows_with_batch_and_a_budget_selects_the_smaller_size() -> None:
    model = _model(norm=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    peaks = {}
    for n in (64, 256, 1024):
        with preserved(model, opt):
            peaks[n] = peak_step_memory(
                lambda n=n: ce(model(_make_batch(n)[0]), _make_batch(n)[1]).backward(),
                torch.device("cpu"),
                model=model,
                optimizer=opt,
            )
    assert peaks[64] < peaks[256] < peaks[1024]  # type: ignore[operator]
    # Activations dominate: from 256 to 1024 the peak grows by at least 3 x 768 x 32 floats.
    assert peaks[1024] - peaks[256] > 3 * 768 * 32 * 4  # type: ignore[operator]
    r = batch_find(model, opt, _make_batch, ce, max_batch=4096)
    by_size = {t.batch_size: t.peak_bytes for t in r.trials}
    assert r.batch_size == 4096 and all(t.fits for t in r.trials)
    budget = (by_size[256] + by_size[512]) // 2  # type: ignore[operator]
    r = batch_find(model, opt, _make_batch, ce, max_batch=4096, budget_bytes=budget)
    assert r.batch_size == 256
    assert r.trials[-1].batch_size == 512 and r.trials[-1].reason == "over budget"
    r = batch_find(model, opt, _make_batch, ce, mode="binary", max_batch=4096, budget_bytes=budget)
    assert 256 <= r.batch_size < 512
    assert all(t.peak_bytes <= budget for t in r.trials if t.fits)  # type: ignore[operator]


def test_cap_at_max_batch_and_dataset_size() -> None:
    from kiln.data.base import ArrayDataset

    model = _model(norm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = batch_find(model, opt, _make_batch, ce, max_batch=40)
    assert r.batch_size == 40 and [t.batch_size for t in r.trials][-2:] == [32, 40]
    x, y = _make_batch(100)
    r = batch_find(model, opt, ArrayDataset(x, y), ce)
    assert r.batch_size == 100 and r.max_batch == 100
    with pytest.raises(ValueError, match="needs max_batch"):
        batch_find(model, opt, _make_batch, ce)
    with pytest.raises(ValueError, match="mode must be"):
        batch_find(model, opt, _make_batch, ce, mode="linear", max_batch=8)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_budget_and_real_measurement() -> None:
    engine = Engine(device="cuda")
    model, _ = engine.setup(_model(norm=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    r = batch_find(model, opt, _make_batch, ce, max_batch=1 << 16, engine=engine)
    peaks = {t.batch_size: t.peak_bytes for t in r.trials}
    assert peaks[1 << 16] > peaks[1 << 12] > 0  # type: ignore[operator]
    budget = (peaks[1 << 12] + peaks[1 << 13]) // 2  # type: ignore[operator]
    r = batch_find(
        model, opt, _make_batch, ce, max_batch=1 << 16, budget_bytes=budget, engine=engine
    )
    assert r.batch_size == 1 << 12

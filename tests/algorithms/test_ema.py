"""EMA of weights: closed-form reference, warmup, buffers, swapping, exact resume, noise effect."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from kiln.algorithms.ema import EMA, ema_decay


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(8, 3, generator=gen)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_matches_closed_form_ema_of_trajectory_without_warmup() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    d, k = 0.9, 7
    ema = EMA(model, decay=d, warmup=False)
    names = [n for n, _ in model.named_parameters()]
    traj = [{n: p.detach().double().clone() for n, p in model.named_parameters()}]
    for _ in range(k):
        _train_step(model, opt, gen)
        ema.update(model)
        traj.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    for n in names:
        # shadow_k = d^k p_0 + sum_{i=1..k} (1 - d) d^(k - i) p_i
        ref = d**k * traj[0][n] + sum((1 - d) * d ** (k - i) * traj[i][n] for i in range(1, k + 1))
        torch.testing.assert_close(ema.shadow[n].double(), ref)
    assert ema.num_updates == k
    # The average is not the current weights: the test would notice a no-op update.
    assert not torch.allclose(ema.shadow[names[0]], dict(model.named_parameters())[names[0]])


def test_warmup_formula_values() -> None:
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 10) == pytest.approx(0.55)
    assert ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.999, 0, warmup=False) == 0.999


def test_first_update_uses_warmup_decay() -> None:
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    p0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * p0 + 0.9 * model.weight.detach())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_decay_outside_open_interval_is_rejected(decay: float) -> None:
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        EMA(nn.Linear(2, 2), decay=decay)


def test_integer_buffers_copied_float_buffers_averaged() -> None:
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), bn)
    mean, count = bn.running_mean, bn.num_batches_tracked
    assert mean is not None and count is not None
    d = 0.5
    ema = EMA(model, decay=d, warmup=False)
    mean0 = mean.clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(8, 3, generator=gen) + 5.0)  # train mode: running stats move
    ema.update(model)
    assert count.item() == 3
    assert ema.shadow["1.num_batches_tracked"].dtype == torch.long
    assert torch.equal(ema.shadow["1.num_batches_tracked"], count)
    torch.testing.assert_close(ema.shadow["1.running_mean"], d * mean0 + (1 - d) * mean)
    assert not torch.allclose(ema.shadow["1.running_mean"], mean)


def test_update_buffers_false_tracks_parameters_only() -> None:
    model = _tiny()
    ema = EMA(model, update_buffers=False)
    assert set(ema.shadow) == {n for n, _ in model.named_parameters()}


def test_shadow_is_detached_and_on_model_device() -> None:
    model = _tiny()
    ema = EMA(model)
    for n, p in model.named_parameters():
        assert not ema.shadow[n].requires_grad
        assert ema.shadow[n].device == p.device
        assert ema.shadow[n].data_ptr() != p.data_ptr()


def test_swapped_restores_even_when_body_raises() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(2)
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        _train_step(model, opt, gen)
        ema.update(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ZeroDivisionError), ema.swapped(model):
        for n, t in model.state_dict().items():
            assert torch.equal(t, ema.shadow[n])
        assert not torch.equal(model.state_dict()["0.weight"], raw["0.weight"])
        raise ZeroDivisionError
    for n, t in model.state_dict().items():
        assert torch.equal(t, raw[n])
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)


def test_copy_to_writes_average_into_another_model() -> None:
    model, other = _tiny(0), _tiny(1)
    ema = EMA(model, decay=0.9)
    ema.copy_to(other)
    for n, t in other.state_dict().items():
        assert torch.equal(t, model.state_dict()[n])


def test_state_dict_round_trip_gives_identical_subsequent_updates() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    ema = EMA(model, decay=0.99)
    for _ in range(4):
        _train_step(model, opt, gen)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = EMA(_tiny(5), decay=0.5)  # different init and decay: both come from the state
    resumed.load_state_dict(state)
    assert resumed.decay == 0.99 and resumed.num_updates == 4
    for _ in range(3):
        _train_step(model, opt, gen)
        ema.update(model)
        resumed.update(model)
    for n, t in ema.shadow.items():
        assert torch.equal(t, resumed.shadow[n]), n


def test_load_state_dict_mismatch_errors_are_clear() -> None:
    ema = EMA(_tiny())
    other = EMA(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match=r"wrong shape: 0\.weight"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({**ema.state_dict(), "shadow": {}})
    with pytest.raises(ValueError, match="exactly the keys"):
        ema.load_state_dict({"shadow": {}})
    with pytest.raises(RuntimeError, match="no tensor named"):
        ema.update(nn.Linear(3, 4))


def test_ema_weights_have_lower_variance_under_noisy_sgd() -> None:
    # SGD on 0.5 * ||w - w*||^2 with gradient noise: the raw weights are a stationary AR(1)
    # process around w* (coefficient 1 - lr = 0.9); an EMA with decay 0.99 shrinks its variance
    # by about (1 - b) / (1 + b) * (1 + a b) / (1 - a b) ~= 0.09.
    gen = torch.Generator().manual_seed(0)
    w_star = torch.linspace(-1.0, 1.0, 16)
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.99)
    raw, avg = [], []
    for step in range(2500):
        model.w.grad = (model.w.detach() - w_star) + torch.randn(16, generator=gen)
        opt.step()
        ema.update(model)
        if step >= 1500:
            raw.append(model.w.detach().clone())
            avg.append(ema.shadow["w"].clone())
    var_raw = torch.stack(raw).var(dim=0).mean()
    var_ema = torch.stack(avg).var(dim=0).mean()
    assert var_ema / var_raw < 0.25, (var_ema, var_raw)
    # And the average is still centred on the optimum.
    torch.testing.assert_close(torch.stack(avg).mean(0), w_star, atol=0.1, rtol=0)

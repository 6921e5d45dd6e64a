"""``kiln.train.precision.Precision`` on its own: autocast, scaler, unscale, step, state.

Each number is checked against the same computation written with plain torch calls
(``torch.autocast``, ``loss.backward()``, ``optimizer.step()``), without an Engine or a Trainer.
fp16 runs on CPU only when forced (``allow_fp16_cpu=True``), which warns; the scaler tests use
an fp32 forward so only the scaler's arithmetic is under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kiln.train.precision import Precision

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _fp16() -> Precision:
    with pytest.warns(RuntimeWarning, match="100x slower"):
        return Precision("fp16", CPU, allow_fp16_cpu=True)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _reference_grads() -> list[torch.Tensor]:
    model = _model()
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    return _grads(model)


def test_unknown_kind_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; allowed: fp32, bf16, fp16"):
        Precision("fp8", CPU)


def test_fp32_is_a_no_op() -> None:
    p = Precision("fp32", CPU)
    assert (p.enabled, p.scaler, p.dtype) == (False, None, torch.float32)
    x, y = _batch()
    model = _model()
    with p.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    assert loss.dtype == torch.float32
    p.backward(loss)
    torch.testing.assert_close(_grads(model), _reference_grads(), rtol=0, atol=0)


def test_bf16_autocasts_like_torch_and_has_no_scaler() -> None:
    p = Precision("bf16", CPU)
    assert p.enabled and p.scaler is None  # bf16 has fp32's exponent range: nothing to scale
    x, y = _batch()
    model, ref = _model(), _model()
    with p.autocast():
        out = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    loss = nn.functional.cross_entropy(out.float(), y)
    p.backward(loss)
    nn.functional.cross_entropy(expected.float(), y).backward()
    assert all(g.dtype == torch.float32 for g in _grads(model))  # master weights stay fp32
    torch.testing.assert_close(_grads(model), _grads(ref), rtol=0, atol=0)
    # and the loss is the fp32 loss to within bf16's 8-bit mantissa
    fp32_loss = nn.functional.cross_entropy(_model()(x), y)
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-2, atol=0)


def test_bf16_step_and_unscale_are_the_plain_optimizer_step() -> None:
    p = Precision("bf16", CPU)
    x, y = _batch()
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for m in (model, ref):
        nn.functional.cross_entropy(m(x), y).backward()
    p.unscale_(opt)  # nothing to unscale: the grads are left as they are
    torch.testing.assert_close(_grads(model), _grads(ref), rtol=0, atol=0)
    assert p.step(opt) is True
    ref_opt.step()
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=0, atol=0)


def test_fp16_on_cpu_is_refused_with_the_reason_and_the_fix() -> None:
    with pytest.raises(ValueError) as info:
        Precision("fp16", CPU)
    msg = str(info.value)
    assert "refused on CPU" in msg and "100x slower" in msg  # the reason
    assert "precision=bf16" in msg and "allow_fp16_cpu" in msg  # the two ways out


def test_fp16_on_cpu_when_forced_warns_and_uses_a_grad_scaler() -> None:
    with pytest.warns(RuntimeWarning, match=r"running fp16 on CPU: .*precision=bf16"):
        p = Precision("fp16", CPU, allow_fp16_cpu=True)
    assert isinstance(p.scaler, torch.amp.GradScaler)
    assert p.scaler.get_scale() == 65536.0  # torch's default initial scale
    with p.autocast():
        out = nn.Linear(4, 2)(torch.randn(3, 4))
    assert out.dtype == torch.float16


def test_fp16_backward_scales_and_unscale_restores_the_true_gradients() -> None:
    p = _fp16()
    scale = p.scaler.get_scale()
    x, y = _batch()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p.backward(nn.functional.cross_entropy(model(x), y))
    reference = _reference_grads()
    torch.testing.assert_close(_grads(model), [g * scale for g in reference])
    p.unscale_(opt)  # clipping happens here, on true gradient values
    torch.testing.assert_close(_grads(model), reference)


def test_fp16_step_equals_the_plain_step_on_finite_gradients() -> None:
    p = _fp16()
    x, y = _batch()
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    p.backward(nn.functional.cross_entropy(model(x), y))
    nn.functional.cross_entropy(ref(x), y).backward()
    assert p.step(opt) is True
    ref_opt.step()
    torch.testing.assert_close(model.state_dict(), ref.state_dict())
    assert p.scaler.get_scale() == 65536.0  # one good step does not grow the scale yet


def test_fp16_step_skips_non_finite_gradients_and_backs_off() -> None:
    p = _fp16()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = copy.deepcopy(model.state_dict())
    p.backward(model(torch.full((2, 6), float("inf"))).sum())
    assert p.step(opt) is False
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert p.scaler.get_scale() == 32768.0  # halved (backoff_factor 0.5)


def test_state_dict_round_trips_the_scale() -> None:
    p = _fp16()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p.backward(model(torch.full((2, 6), float("nan"))).sum())
    p.step(opt)
    state = p.state_dict()
    assert state["kind"] == "fp16"
    other = _fp16()
    other.load_state_dict(state)
    assert other.scaler.get_scale() == p.scaler.get_scale() == 32768.0
    bf16 = Precision("bf16", CPU)
    assert bf16.state_dict() == {"kind": "bf16", "scaler": None}
    bf16.load_state_dict(state)  # a scaler state has nowhere to go: ignored, no error
    assert bf16.scaler is None


@pytest.mark.gpu
def test_fp16_on_cuda_needs_no_flag_and_skips_non_finite_steps() -> None:
    cuda = torch.device("cuda")
    p = Precision("fp16", cuda)  # no refusal and no warning off the CPU
    assert isinstance(p.scaler, torch.amp.GradScaler) and p.scaler.get_scale() == 65536.0
    model = _model().to(cuda)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with p.autocast():
        out = model(torch.randn(4, 6, device=cuda))
    assert out.dtype == torch.float16
    before = copy.deepcopy(model.state_dict())
    p.backward(model(torch.full((2, 6), float("inf"), device=cuda)).sum())
    assert p.step(opt) is False
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert Precision("bf16", cuda).scaler is None

"""The training doctor: one small buggy loop per mistake, each found with its code and place.

Every fixture below is a hand-written loop with exactly one mistake (the clean loop has none).
A finding must carry the right code and a ``where`` that points at the right module or at the
``file:line`` of the offending call in the fixture's own source.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from doctor_cases import MISTAKES, Case, data, net, site
from torch import nn
from training import plain_step

from kiln.cli.doctor import doctor_config
from kiln.config import load_config
from kiln.doctor import Finding, check
from kiln.doctor.checks import cudnn_shape_findings, loader_findings
from kiln.doctor.findings import ADVICE, format_report

# ---------------------------------------------------------------------- the tests


def test_clean_loop_has_no_findings(clean: Case) -> None:
    assert clean.run() == []


@pytest.mark.parametrize("name", list(MISTAKES))
def test_each_mistake_is_found_where_it_is(name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(name)
    assert case.code == MISTAKES[name]
    findings = case.run()
    assert [f.code for f in findings] == [case.code], format_report(findings)
    found = findings[0]
    for needle in case.where:
        assert needle in found.where, (needle, found.where)
    assert found.what and found.why == ADVICE[found.code].why and found.fix


def test_every_check_has_a_fixture() -> None:
    # GPU-only checks are simulated below; the host's load in test_doctor_threads.py.
    simulated = {"pin-memory-off", "cudnn-benchmark-shapes", "threads-oversubscribed"}
    assert set(MISTAKES.values()) | simulated == set(ADVICE)


def test_costs_are_measured(
    missing_zero_grad: Case, frozen_in_optimizer: Case, clip_before_unscale: Case
) -> None:
    grown = missing_zero_grad.run()[0].cost or ""
    norms = [float(v.rstrip(",")) for v in grown.split(":")[1].split("(")[0].split()]
    assert len(norms) == 3 and norms[-1] > norms[0]  # gradients pile up
    moved = frozen_in_optimizer.run()[0]
    assert moved.severity == "error" and "changed during" in (moved.cost or "")
    clipped = clip_before_unscale.run()[0]
    assert "loss scale 65536" in (clipped.cost or "")


def test_sync_on_cpu_is_a_note_with_a_count(item_in_step: Case) -> None:
    found = item_in_step.run()[0]
    assert found.severity == "info" and "1x per step" in found.what and found.cost


def test_frozen_without_stale_grads_is_a_warning() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].requires_grad_(False)
    findings = check(model, data(), plain_step(model, opt), optimizer=opt)
    assert [(f.code, f.severity) for f in findings] == [("frozen-in-optimizer", "warning")]


def test_clip_after_unscale_is_clean_and_scaler_is_found() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")

    def step(batch: Any) -> None:
        x, y = batch
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    assert check(model, data(), step, optimizer=opt, scaler=scaler) == []


def test_state_is_restored_and_patches_removed(missing_zero_grad: Case) -> None:
    before = {k: v.clone() for k, v in missing_zero_grad.model.state_dict().items()}
    rng = torch.get_rng_state()
    missing_zero_grad.run()
    after = missing_zero_grad.model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert all(p.grad is None for p in missing_zero_grad.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert "item" not in vars(torch.Tensor) and "__float__" not in vars(torch.Tensor)
    assert torch.autograd.backward.__module__ == "torch.autograd"


def test_steps_must_be_positive(clean: Case) -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        check(clean.model, clean.loader, clean.step, steps=0)


def test_pin_memory_off_with_a_gpu_is_reported() -> None:
    model = nn.Linear(8, 3)
    found = loader_findings(data(), model, torch.device("cuda"))  # the device a GPU run sees
    assert [f.code for f in found] == ["pin-memory-off"]
    assert "pin_memory=False" in found[0].where
    assert loader_findings(data(pin_memory=True), model, torch.device("cuda")) == []
    assert loader_findings(data(), model, torch.device("cpu")) == []


def test_cudnn_benchmark_with_changing_shapes_is_reported() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    cuda = torch.device("cuda")
    changing = [((8, 1, 16, w),) for w in (16, 20, 24)]
    steady = [((8, 1, 16, 16),), ((8, 1, 16, 16),), ((3, 1, 16, 16),)]  # a short last batch
    found = cudnn_shape_findings(conv, changing, cuda, benchmark=True)
    assert [f.code for f in found] == ["cudnn-benchmark-shapes"]
    assert "8x1x16x20" in found[0].where
    assert cudnn_shape_findings(conv, steady, cuda, benchmark=True) == []
    assert cudnn_shape_findings(conv, changing, cuda, benchmark=False) == []
    assert cudnn_shape_findings(nn.Linear(4, 4), changing, cuda, benchmark=True) == []


def test_input_shapes_are_recorded_for_the_cudnn_check(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    conv(torch.randn(1, 1, 8, 8))
    seen: list[Any] = []

    def spy(model: nn.Module, shapes: Any, device: Any, **kw: Any) -> list[Finding]:
        seen.extend(shapes)
        return []

    monkeypatch.setattr("kiln.doctor.steps.cudnn_shape_findings", spy)
    batches = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    check(conv, batches, lambda x: conv(x).sum().backward())
    assert seen == [((2, 1, 8, 8),)] * 3


def test_kilns_own_loop_is_clean() -> None:
    fast = ["data.batch_size=32", "model.kwargs.hidden=[32]"]
    findings, ran = doctor_config(load_config("configs/digits_mlp.yaml", fast))
    assert findings == [], format_report(findings)
    assert "3 steps" in ran


def test_kilns_own_fp16_loop_only_reports_fp16_on_cpu() -> None:
    # Accumulation, clipping and a GradScaler: no missing zero_grad, no clip before unscale,
    # no syncs from the scaler's own inf checks.
    overrides = [
        "precision=fp16",
        "allow_fp16_cpu=true",
        "train.accumulate=2",
        "train.clip_norm=1.0",
        "model.kwargs.hidden=[32]",
    ]
    with pytest.warns(RuntimeWarning, match="running fp16 on CPU"):
        findings, ran = doctor_config(load_config("configs/digits_mlp.yaml", overrides))
    assert [f.code for f in findings] == ["fp16-on-cpu"], format_report(findings)
    assert "5 steps" in ran and "x" in (findings[0].cost or "")


# ---------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_batch_left_on_cpu_and_pin_memory() -> None:
    model = net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = plain_step(model, opt)  # never moves the batch
    findings = check(model, data(), step, optimizer=opt)
    codes = [f.code for f in findings]
    assert codes == ["wrong-device", "pin-memory-off"], format_report(findings)
    assert site(step, "model(x)") in findings[0].where


@pytest.mark.gpu
def test_gpu_item_is_a_warning_and_cudnn_shapes() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).cuda()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    batches = [torch.randn(4, 1, 16, w, device="cuda") for w in (16, 20, 24)]
    values: list[float] = []

    def step(x: torch.Tensor) -> None:
        loss = conv(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        values.append(loss.item())

    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        findings = check(conv, batches, step, optimizer=opt)
    finally:
        torch.backends.cudnn.benchmark = was
    by_code = {f.code: f for f in findings}
    assert set(by_code) == {"host-sync", "cudnn-benchmark-shapes"}, format_report(findings)
    assert by_code["host-sync"].severity == "warning"
    assert by_code["host-sync"].where == site(step, "loss.item()")


# ---------------------------------------------------------------------- docstring examples


@pytest.mark.parametrize(
    "name",
    [
        "kiln.doctor.steps",
        "kiln.doctor.checks",
        "kiln.doctor.findings",
        "kiln.doctor.sites",
        "kiln.doctor.threads",
        "kiln.doctor",
        "kiln.cli.doctor",
    ],
)
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert result.attempted > 0

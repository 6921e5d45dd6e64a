"""``kiln.perf.bench``: the variant plan, the optimizer switch, the pick, one tiny ablation."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kiln.config import Config, load_config
from kiln.data.base import DataInfo
from kiln.perf import bench
from kiln.perf.bench import (
    VARIANTS,
    BenchOptions,
    BenchRow,
    ablate,
    pick_best,
    plan_variants,
    set_optimizer_impl,
)

CPU = torch.device("cpu")
FLAT = DataInfo("classification", (64,), num_classes=10)
IMAGE = DataInfo("classification", (1, 32, 32), num_classes=10)


@pytest.fixture(autouse=True)
def _quiet_kineto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")


def _plan(info: DataInfo, *overrides: str, names: tuple[str, ...] | None = None) -> dict:
    cfg = load_config(None, ["model.kwargs.hidden=[16]", *overrides])
    return {v.name: v for v in plan_variants(cfg, info, CPU, names)}


def test_plan_skips_what_cannot_apply_with_the_reason() -> None:
    plan = _plan(FLAT)
    assert list(plan) == list(VARIANTS)
    assert "not images" in (plan["channels_last"].skip or "")
    assert "host-to-GPU" in (plan["pin_memory"].skip or "")
    assert plan["precision"].overrides == ("precision=bf16",) and plan["precision"].skip is None
    assert plan["accumulate"].overrides == ("data.batch_size=32", "train.accumulate=2")
    assert plan["batch_x2"].overrides == ("data.batch_size=128",)
    assert plan["foreach"].optimizer == "foreach" and plan["foreach"].overrides == ()
    assert plan["checkpointing"].skip is None  # the MLP's hidden layers


def test_plan_follows_the_baseline() -> None:
    image = _plan(IMAGE, "model.name=resnet", "precision=bf16", "data.batch_size=63")
    assert image["channels_last"].skip is None
    assert image["precision"].overrides == ("precision=fp32",)  # the change from a bf16 baseline
    assert "does not halve" in (image["accumulate"].skip or "")
    workers = _plan(FLAT, "data.num_workers=2", "compile=true")
    assert workers["workers"].overrides == ("data.num_workers=0",)
    assert workers["compile"].overrides == ("compile=false",)
    chosen = _plan(FLAT, names=("batch_x2", "pin_memory"))
    assert list(chosen) == ["baseline", "pin_memory", "batch_x2"]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="did you mean 'precision'"):
        BenchOptions(variants=("precison",))
    with pytest.raises(ValueError, match=r"bench\.steps >= 4"):
        BenchOptions(steps=3, warmup=1)
    with pytest.raises(ValueError, match="--repeats"):
        BenchOptions(repeats=0)


@pytest.mark.parametrize("impl", ["foreach", "forloop"])
def test_optimizer_switch_keeps_the_math(impl: str) -> None:
    torch.manual_seed(0)
    nets = [nn.Linear(8, 4) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=0.1, fused=True) for n in nets]
    set_optimizer_impl(opts[1], impl)
    assert opts[1].param_groups[0]["fused"] is False
    assert opts[1].param_groups[0]["foreach"] is (impl == "foreach")
    x = torch.randn(16, 8)
    for _ in range(3):
        for net, opt in zip(nets, opts, strict=True):
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="before its first step"):
        set_optimizer_impl(opts[0], impl)


def _row(name: str, speedup: float, ok: bool = True, **kw: object) -> BenchRow:
    kw.setdefault("speedups", [speedup])
    return BenchRow(name, name, [f"{name}=1"], "ok", speedup=speedup, within_tolerance=ok, **kw)  # type: ignore[arg-type]


def test_pick_best_is_the_fastest_config_within_tolerance() -> None:
    base = _row("baseline", 1.0)
    rows = [
        base,
        _row("batch_x2", 3.0, ok=False),  # faster but less accurate
        _row("foreach", 2.5, code_change="set in code"),  # not a config setting
        _row("workers", 1.5),
        _row("precision", 1.8),
        BenchRow("compile", "compile=true", [], "skipped", reason="short budget"),
    ]
    assert pick_best(rows).name == "precision"
    assert pick_best([base, _row("workers", 1.02)]).name == "baseline"  # below min_speedup
    assert pick_best([base, _row("workers", 1.02)], min_speedup=1.0).name == "workers"
    # Faster by the median but slower in one repeat: within the noise, not picked.
    noisy = _row("precision", 1.8, speedups=[1.8, 0.5, 2.0])
    assert not noisy.consistent and pick_best([base, noisy]).name == "baseline"


def test_tiny_ablation_has_every_row(make_cfg: Callable[..., Config]) -> None:
    opts = BenchOptions(
        steps=8, warmup=1, repeats=1, variants=("foreach", "channels_last", "batch_x2")
    )
    lines: list[str] = []
    res = ablate(make_cfg(), opts, progress=lines.append)
    assert [r.name for r in res.rows] == ["baseline", "channels_last", "foreach", "batch_x2"]
    status = {r.name: r.status for r in res.rows}
    assert status == {
        "baseline": "ok",
        "channels_last": "skipped",
        "foreach": "ok",
        "batch_x2": "ok",
    }
    base, x2 = res.row("baseline"), res.row("batch_x2")
    assert base.speedup == 1.0 and base.metric_delta == 0.0 and base.memory_ratio == 1.0
    assert base.steps == 8 and x2.steps == 4  # the same samples in half the updates
    assert res.budget_samples == 8 * 64 and res.metric == "acc" and res.higher_is_better
    for r in (base, x2, res.row("foreach")):
        assert r.samples_per_s and r.samples_per_s > 0 and r.step_ms and r.step_ms > 0
        assert r.peak_mb and r.peak_mb > 0
        assert r.metric is not None and 0 <= r.metric <= 1
        assert len(r.runs) == 1
    assert res.row("foreach").code_change and res.best in ("baseline", "batch_x2")
    assert len(lines) == 3
    record = json.loads(json.dumps(res.to_dict()))
    assert [r["name"] for r in record["rows"]] == [
        "baseline",
        "channels_last",
        "foreach",
        "batch_x2",
    ]


def test_a_failing_variant_is_reported_not_fatal(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(optimizer: torch.optim.Optimizer, impl: str) -> None:
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setattr(bench, "set_optimizer_impl", broken)
    opts = BenchOptions(steps=5, warmup=1, repeats=2, variants=("forloop",))
    res = ablate(make_cfg(), opts)
    row = res.row("forloop")
    assert row.status == "failed" and row.reason == "RuntimeError: no such kernel"
    assert len(res.row("baseline").runs) == 2


def test_an_interrupt_stops_the_whole_bench(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from kiln.train.trainer import TrainingInterrupted

    def interrupted(optimizer: torch.optim.Optimizer, impl: str) -> None:
        raise TrainingInterrupted("SIGINT", None, Path("scratch"))

    monkeypatch.setattr(bench, "set_optimizer_impl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablate(make_cfg(), BenchOptions(steps=5, warmup=1, repeats=1, variants=("foreach",)))

"""``kiln.perf.profile``: a real torch.profiler trace of Trainer updates, and the op tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.config import Config
from kiln.perf.measure import (
    OpRow,
    cpu_peak_bytes,
    measurement_config,
    op_rows,
    ops_markdown,
    resident_bytes,
)
from kiln.perf.profile import ProfilerCallback, Schedule, profile_training


@pytest.fixture(autouse=True)
def _quiet_kineto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")


def test_trace_parses_and_holds_the_models_ops(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    out = tmp_path / "prof"
    res = profile_training(make_cfg(), out, schedule=Schedule(wait=1, warmup=1, active=2), rows=5)
    trace = json.loads(res.trace.read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::addmm" in names or "aten::linear" in names
    assert any(n and n.startswith("ProfilerStep#") for n in names)  # the recorded updates
    assert list((out / "tb").glob("*.pt.trace.json")), "no TensorBoard trace"
    assert res.memory_snapshot is None  # CPU: no CUDA allocator history
    # The tables: sorted, marker events left out, the MLP's matmuls present.
    assert 0 < len(res.by_time) <= 5 and 0 < len(res.by_memory) <= 5
    times = [r.self_cpu_ms for r in res.by_time]
    assert times == sorted(times, reverse=True)
    mems = [r.self_cpu_mem_bytes for r in res.by_memory]
    assert mems == sorted(mems, reverse=True) and mems[0] > 0
    shown = {r.name for r in res.by_time + res.by_memory}
    assert shown & {"aten::addmm", "aten::mm", "aten::linear"}
    assert not any(n.startswith(("ProfilerStep", "[memory]")) for n in shown)
    assert not any(" at 0x" in n for n in shown)
    json.dumps(res.to_dict())  # plain values only


def test_short_config_is_extended_to_cover_the_schedule(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    seen: list[int] = []

    class Count:
        def on_update_end(self, trainer: object, step: int) -> None:
            seen.append(step)

    cfg = make_cfg("train.max_steps=2")
    res = profile_training(cfg, tmp_path, schedule=Schedule(wait=0, warmup=1, active=3), rows=3)
    assert res.trace.is_file() and res.schedule.total == 4
    # The Trainer itself stops as soon as the schedule ends (callback request), not later.
    from kiln.train.trainer import Trainer

    sched = torch.profiler.schedule(wait=0, warmup=1, active=1, repeat=1)
    cb = ProfilerCallback(lambda device: torch.profiler.profile(schedule=sched), steps=2)
    result = Trainer(
        make_cfg("train.epochs=5"), callbacks=[cb, Count()], run_dir=tmp_path / "run", verbose=False
    ).fit()
    assert cb.done == 2 and not cb.running and seen == [1, 2]
    assert result.stopped == "profile schedule complete"


def test_schedule_and_options_are_validated() -> None:
    assert Schedule(wait=2, warmup=1, active=3, repeat=2).total == 12
    with pytest.raises(ValueError, match=r"profile\.active must be >= 1"):
        Schedule(active=0)
    with pytest.raises(ValueError, match=r"profile\.wait must be >= 0"):
        Schedule(wait=-1)


def test_measurement_config_is_quiet_and_validated() -> None:
    from kiln.config import ConfigError, load_config

    cfg = measurement_config(load_config(None, ["resume=runs/x"]), ["precision=bf16"])
    assert (cfg.log.progress, cfg.log.tensorboard, cfg.resume) == (False, False, None)
    assert cfg.precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        measurement_config(load_config(None), ["precision=fp8"])


def test_op_rows_and_markdown() -> None:
    with torch.profiler.profile(profile_memory=True) as prof:
        torch.randn(128, 128) @ torch.randn(128, 128)
    rows = op_rows(prof.key_averages(), sort_by="self_cpu_mem_bytes", limit=3)
    assert len(rows) <= 3 and any(r.name == "aten::randn" or r.name == "aten::mm" for r in rows)
    row = OpRow("aten::mm", 4, 2.0, 2.5, 0.0, 4096, 0)
    table = ops_markdown([row], per_step=2).splitlines()
    assert table[2] == "| aten::mm | 2 | 1.000 | 1.250 | 2.0 |"


def test_memory_measurements_match_known_sizes() -> None:
    net = nn.Linear(4, 2)  # 8 + 2 float32 = 40 bytes
    assert resident_bytes(net, torch.optim.SGD(net.parameters(), lr=0.1)) == 40
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 4)).sum().backward()
    opt.step()  # adds grads (40 B), exp_avg and exp_avg_sq (80 B) and two step scalars
    assert resident_bytes(net, opt) >= 160
    with torch.profiler.profile(profile_memory=True) as prof:
        a = torch.zeros(1024, 1024)  # 4 MiB live at once with b
        b = torch.zeros(1024, 1024)
        del a, b
        torch.zeros(256)
    peak = cpu_peak_bytes(prof)
    assert 8 * 2**20 <= peak < 8 * 2**20 + 64 * 1024

"""``kiln.perf.bottleneck``: phase times of hand-run Trainer updates, host reads, profiles."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kiln.config import Config
from kiln.perf.bottleneck import PHASES, HostReads, find_bottleneck


@pytest.fixture(autouse=True)
def _quiet_kineto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")


def test_phases_cover_the_step_and_syncs_are_found(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    report = find_bottleneck(make_cfg(), steps=4, warmup=1, rows=5, out=tmp_path)
    assert list(report.phases_ms) == list(PHASES)
    assert all(v >= 0 for v in report.phases_ms.values())
    assert report.phases_ms["forward"] > 0 and report.phases_ms["backward"] > 0
    assert math.isclose(sum(report.phases_ms.values()), report.step_ms, rel_tol=1e-6)
    assert math.isclose(sum(report.shares.values()), 1.0, rel_tol=1e-6)
    assert len(report.step_ms_each) == 4 and min(report.step_ms_each) > 0
    assert report.dominant in PHASES and report.hint
    # One host read per update: the Trainer's non-finite check (train.nonfinite=stop), which
    # reads the found-inf flag in kiln.train.found_inf (Engine.grads_finite).
    assert report.syncs_per_step == 1
    assert [s.where.split(" ")[0].rsplit(":", 1)[0] for s in report.sync_sites] == [
        "kiln/train/found_inf.py"
    ]
    assert report.sync_sites[0].what == "__bool__"
    assert report.device_syncs_per_step is None  # CPU
    assert (
        report.top_functions and report.top_functions[0].own_ms >= report.top_functions[-1].own_ms
    )
    assert {o.name for o in report.top_ops} & {"aten::addmm", "aten::mm"}
    assert (tmp_path / "cprofile.pstats").is_file()
    assert "CPU" in report.notes[-1]


def test_auto_microbatch_splits_the_profiled_step_as_in_training(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    # The profiler runs the Trainer's train_step with the same AutoMicrobatch: a batch of 64
    # that the allocator refuses above 16 examples is profiled as 4 micro-batches of 16.
    cfg = make_cfg(
        "model.target=usermodels:OOMNet", "model.kwargs={limit: 16}", "train.auto_microbatch=true"
    )
    report = find_bottleneck(cfg, steps=2, warmup=1, rows=3, out=tmp_path)
    assert report.phases_ms["forward"] > 0 and len(report.step_ms_each) == 2


def test_logging_and_checks_change_the_sync_count(make_cfg: Callable[..., Config]) -> None:
    # Logging every update reads the loss and the grad norm: 1 + 2 reads per update.
    logged = find_bottleneck(make_cfg("train.log_every=1"), steps=3, warmup=0)
    assert logged.syncs_per_step == 3
    assert {s.what for s in logged.sync_sites} == {"__bool__", "item"}
    # No check, no logging in the window: no host reads at all.
    none = find_bottleneck(make_cfg("train.nonfinite=ignore"), steps=3, warmup=0)
    assert none.syncs_per_step == 0 and none.sync_sites == []
    assert none.phases_ms["syncs"] >= 0


def test_accumulation_counts_one_update_per_step(make_cfg: Callable[..., Config]) -> None:
    report = find_bottleneck(
        make_cfg("train.accumulate=2", "train.nonfinite=ignore", "train.log_every=2"),
        steps=2,
        warmup=0,
    )
    # Two updates, the second one logs: 2 reads over 2 updates.
    assert report.syncs_per_step == 1
    assert report.top_ops and report.step_ms > 0


def test_host_reads_count_by_call_site_and_device() -> None:
    t = torch.ones(3)
    with HostReads(torch.device("cpu")) as reads:
        t.sum().item()
        t.sum().item()
        float(t[0])
        t.tolist()
        t.cpu()  # a no-op on a CPU tensor: not a read
    counts: dict[str, int] = {}
    for (_, what), n in reads.counts.items():
        counts[what] = counts.get(what, 0) + n
    assert counts == {"item": 2, "__float__": 1, "tolist": 1}
    assert len(reads.counts) == 4  # two call sites of item
    assert all("test_bottleneck.py" in where for where, _ in reads.counts)
    with HostReads(torch.device("cuda")) as gpu_reads:  # a GPU job: CPU scalars cost no sync
        t.sum().item()
    assert not gpu_reads.counts


def test_bad_arguments(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        find_bottleneck(make_cfg(), steps=0)


def test_the_hint_leaves_out_what_the_config_does() -> None:
    from kiln.config import load_config
    from kiln.perf.bottleneck import _compute_hint

    plain = _compute_hint(load_config(None), image=False)
    assert "precision=bf16" in plain and "compile=true" in plain
    assert "channels_last" not in plain and "than 64" in plain
    tuned = _compute_hint(load_config(None, ["precision=bf16", "compile=true"]), image=True)
    assert "precision=bf16" not in tuned and "compile=true" not in tuned
    assert "channels_last=true" in tuned
    ckpt = _compute_hint(load_config(None, ["train.activation_checkpointing=true"]), image=False)
    assert "turn it off" in ckpt

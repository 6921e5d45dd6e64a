"""``kiln tune lr|batch``: the printed hints, the written files, and one clear line on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from runners import ROOT, run_kiln

from kiln.cli.errors import run_cli
from kiln.cli.tune import run_tune, split_tune_options

CFG = str(ROOT / "configs/digits_mlp.yaml")


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A fast digits MLP job writing under ``tmp_path`` (and a quiet profiler, restored after)."""
    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")
    return [CFG, f"out_dir={tmp_path}", "model.kwargs.hidden=[32]", "log.tensorboard=false"]


def test_tune_lr_prints_the_hint_and_writes_plot_and_json(tmp_path: Path) -> None:
    proc = run_kiln(
        "tune", "lr", CFG, f"out_dir={tmp_path}", "model.kwargs.hidden=[32]", "tune.steps=30"
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "digits_mlp-lr-find"
    record = json.loads((out / "lr_find.json").read_text())
    assert 2 < len(record["lrs"]) <= 30 and record["lrs"][0] == 1e-7
    assert len(record["losses"]) == len(record["smoothed"]) == len(record["lrs"])
    assert record["num_steps"] == 30 and record["configured_lr"] == 0.002
    suggestion = record["suggestion"]
    assert 1e-7 < suggestion < record["lrs"][-1]
    assert f"use optim.lr={suggestion:.2g}" in proc.stdout
    assert str(out / "lr_find.png") in proc.stdout
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert "USDT" not in proc.stderr and "Traceback" not in proc.stderr


def test_tune_batch_caps_at_max_batch_and_a_budget_picks_a_smaller_size(
    small: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_tune("batch", [*small, "tune.max_batch=256"])
    out = capsys.readouterr().out
    assert "largest batch size that fits: 256" in out and "use data.batch_size=256" in out
    peaks = {
        int(n): float(mb) for n, mb in re.findall(r"batch\s+(\d+)\s+fits\s+peak ([\d.]+)", out)
    }
    assert sorted(peaks) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert peaks[64] < peaks[128] < peaks[256]
    budget = (peaks[64] + peaks[128]) / 2
    run_tune("batch", [*small, "tune.max_batch=256", "--mode", "binary", f"--budget-mb={budget}"])
    out = capsys.readouterr().out
    found = int(re.search(r"use data.batch_size=(\d+)", out).group(1))  # type: ignore[union-attr]
    assert 64 <= found < 128
    assert "over budget" in out


def _one_line_error(capsys: pytest.CaptureFixture[str], what: str, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_tune(what, args), debug=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_input_is_one_clear_line(small: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ("rate", small, "unknown tune target 'rate'"),
        ("lr", [*small, "tune.steps=abc"], "tune.steps='abc' is not a valid int"),
        ("lr", [*small, "tune.stepz=3"], "unknown tune option 'stepz'"),
        ("lr", [*small, "tune.mode=binary"], "applies to 'kiln tune batch'"),
        ("lr", [*small, "--steps"], "--steps needs a value"),
        ("lr", [*small, "tune.start_lr=1", "tune.end_lr=0.1"], "start_lr < end_lr"),
        ("batch", [*small, "tune.mode=linear"], "allowed: power, binary"),
        ("batch", [*small, "tune.budget_mb=0.01"], "not even batch size 1 fits"),
        ("batch", [*small, "optim.lr_rate=1"], "did you mean 'optim.lr'?"),
    ]
    for what, args, needle in cases:
        assert needle in _one_line_error(capsys, what, args), (what, args)


def test_split_tune_options_forms_and_defaults() -> None:
    opts, rest = split_tune_options(
        "batch", ["c.yaml", "--budget-mb=64", "data.batch_size=8", "--max_batch", "100"]
    )
    assert rest == ["c.yaml", "data.batch_size=8"]
    assert opts == {"mode": "power", "budget_mb": 64.0, "max_batch": 100}
    opts, rest = split_tune_options("lr", ["tune.end_lr=1", "--steps", "20"])
    assert rest == [] and opts == {"steps": 20, "start_lr": 1e-7, "end_lr": 1.0, "smoothing": 0.98}

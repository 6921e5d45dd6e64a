"""``kiln profile`` and ``kiln bench`` end to end: files written, tables printed, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runners import ROOT, run_kiln

from kiln.cli.options import BenchCliOptions, ProfileOptions, parse_options, take_options
from kiln.config import load_config

CFG = str(ROOT / "configs/digits_mlp.yaml")
SMALL = (CFG, "model.kwargs.hidden=[32]")


def test_profile_cli_writes_trace_and_tables(tmp_path: Path) -> None:
    out = tmp_path / "p"
    proc = run_kiln("profile", *SMALL, "--steps", "2", "profile.rows=4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "top ops by self CPU time" in proc.stdout and "aten::" in proc.stdout
    assert "USDT" not in proc.stderr and "Traceback" not in proc.stderr
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    record = json.loads((out / "profile.json").read_text())
    assert 0 < len(record["by_time"]) <= 4 and record["schedule"]["active"] == 2
    assert list((out / "tb").glob("*.pt.trace.json"))


def test_profile_bottleneck_cli(tmp_path: Path) -> None:
    proc = run_kiln("profile", *SMALL, "--bottleneck", "--steps", "2", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "digits_mlp-profile"  # the default folder
    record = json.loads((out / "bottleneck.json").read_text())
    assert set(record["phases_ms"]) == {
        "data",
        "to_device",
        "forward",
        "backward",
        "optimizer",
        "syncs",
    }
    assert record["syncs_per_step"] == 1 and (out / "cprofile.pstats").is_file()
    assert "where one update's time goes" in proc.stdout and "most time:" in proc.stdout


def test_bench_cli_table_json_and_apply(tmp_path: Path) -> None:
    out = tmp_path / "b"
    proc = run_kiln(
        "bench",
        *SMALL,
        "bench.steps=8",
        "bench.warmup=1",
        "bench.variants=batch_x2,pin_memory",
        "--repeats",
        "1",
        "--apply",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "technique ablation" in proc.stdout and "--apply:" in proc.stdout
    record = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in record["rows"]] == ["baseline", "pin_memory", "batch_x2"]
    assert record["rows"][1]["status"] == "skipped"
    assert "| batch_x2 |" in (out / "bench.md").read_text()
    best = load_config(out / "best.yaml")
    applied = record["applied"]
    assert applied["variant"] in ("baseline", "batch_x2")
    assert best.data.batch_size == (128 if applied["variant"] == "batch_x2" else 64)
    assert best.model.kwargs["hidden"] == [32]  # the command line's overrides are kept


def test_bad_options_give_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.cli.bench import run_bench
    from kiln.cli.errors import run_cli
    from kiln.cli.profile import run_profile

    cases = [
        (
            lambda: run_bench([CFG, "bench.stepz=3"]),
            "unknown bench option 'stepz'",
            "did you mean 'bench.steps'?",
        ),
        (lambda: run_bench([CFG, "bench.variants=fp8"]), "unknown bench variant 'fp8'", ""),
        (lambda: run_bench([CFG, "bench.steps=2"]), "bench.steps >= 6", ""),
        (lambda: run_profile([CFG], steps=0), "--steps must be >= 1", ""),
        (lambda: run_profile([CFG, "profile.rows=0"]), "profile.rows:", "greater than or equal"),
        (lambda: run_profile([str(tmp_path / "nope.yaml")]), "config file not found", ""),
    ]
    for fn, *needles in cases:
        with pytest.raises(SystemExit) as exc:
            run_cli(fn, debug=False)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
        assert all(n in err for n in needles), err


def test_split_options() -> None:
    values, rest = take_options("bench", ["c.yaml", "bench.steps=9", "optim.lr=1"])
    given = parse_options(BenchCliOptions, "bench", values).model_dump(exclude_unset=True)
    assert given == {"steps": 9} and rest == ["c.yaml", "optim.lr=1"]
    with pytest.raises(ValueError, match=r"bench\.steps='x' is not a valid int"):
        parse_options(BenchCliOptions, "bench", {"steps": "x"})
    opts = parse_options(ProfileOptions, "profile", {"rows": "5"}).model_dump()
    assert opts == {"wait": 1, "warmup": None, "repeat": 1, "rows": 5}


def test_a_run_directory_stands_for_its_config(tmp_path: Path) -> None:
    from kiln.cli.profile import load_job
    from kiln.config import dump_config

    (tmp_path / "config.yaml").write_text(dump_config(load_config(CFG)))
    cfg, path, overrides = load_job([str(tmp_path), "optim.lr=0.5"])
    assert path == str(tmp_path / "config.yaml") and overrides == ["optim.lr=0.5"]
    assert cfg.name == "digits_mlp" and cfg.optim.lr == 0.5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a Kiln run directory"):
        load_job([str(tmp_path / "empty")])

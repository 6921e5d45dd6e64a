"""``kiln doctor`` end to end: kiln's own loop comes out clean, fp16 on the CPU is reported."""

from __future__ import annotations

from pathlib import Path

from runners import ROOT, run_kiln

from kiln.config import dump_config, load_config

CONFIG = str(ROOT / "configs/digits_mlp.yaml")


def test_kilns_own_loop_has_no_findings() -> None:
    proc = run_kiln("doctor", CONFIG)
    assert proc.returncode == 0, proc.stderr
    assert "digits_mlp" in proc.stdout and "steps of kiln's training step" in proc.stdout
    assert "no findings" in proc.stdout and "[error]" not in proc.stdout, proc.stdout


def test_run_directory_with_fp16_on_cpu_reports_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(CONFIG)))
    proc = run_kiln("doctor", str(run), "precision=fp16", "allow_fp16_cpu=true")
    assert proc.returncode == 0, proc.stderr  # findings are advice
    assert "[warning] fp16-on-cpu: float16 runs on the CPU" in proc.stdout, proc.stdout
    assert "where: config: precision=fp16" in proc.stdout
    assert "cost:  forward + backward" in proc.stdout and "[error]" not in proc.stdout
    assert not list(tmp_path.glob("runs*"))  # nothing written


def test_not_a_run_directory_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_kiln("doctor", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: not a Kiln run directory"), proc.stderr

"""Each benchmark script runs in --quick mode and prints its ratio table (numbers not judged)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from runners import ROOT, kiln_env

SCRIPTS = [
    "loop_overhead.py",
    "import_time.py",
    "time_to_accuracy.py",
    "regularizers.py",
    "checkpointing.py",
    "compile.py",
    "quantize.py",
    "serve.py",
    "transfer.py",
    "text_transfer.py",
    pytest.param("ddp_scaling.py", marks=pytest.mark.distributed),
]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_mode_runs(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=kiln_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio" in proc.stdout.lower() or "vs import torch" in proc.stdout
    assert "|---" in proc.stdout  # a results table was printed

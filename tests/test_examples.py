"""The examples run as documented and reach what they print."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from runners import ROOT, kiln_env


def test_engine_loop_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/engine_loop.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=kiln_env(),
        check=True,
    ).stdout
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert acc > 0.9 and "after 100 updates" in out


@pytest.mark.distributed
def test_ddp_loop_example_under_torchrun() -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "examples/ddp_loop.py"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=kiln_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("epoch 5:") == 1 and "(2 process(es))" in out.stdout

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


def test_multitask_example_down_weights_the_noisy_task() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/multitask.py"), "--steps", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        env=kiln_env(),
        check=True,
    ).stdout
    found = re.search(r"digit accuracy ([0-9.]+), parity accuracy ([0-9.]+)", out)
    weights = re.search(r"weights: digit ([0-9.]+), parity ([0-9.]+)", out)
    assert found and weights, out
    assert float(found.group(1)) > 0.9 and float(found.group(2)) > 0.85
    assert float(weights.group(2)) < float(weights.group(1))  # the noisy task weighs less

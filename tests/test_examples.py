"""The examples run as documented and reach what they print."""

from __future__ import annotations

import re
import subprocess
import sys

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

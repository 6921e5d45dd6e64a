"""Helpers for tests that run the ``kiln`` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / "tests" / "helpers"


def kiln_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: the test helpers importable (user models).

    An existing ``PYTHONPATH`` is kept after the helpers, so a scratch copy of ``src`` put first
    by ``make mutation`` is the Kiln the subprocess imports.
    """
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def run_kiln(
    *args: str, cwd: Path | None = None, timeout: float = 300, path: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kiln ARGS`` and capture its output; ``path``: more importable folders."""
    env = kiln_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *map(str, path)])
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def popen_kiln(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kiln_env(),
    )

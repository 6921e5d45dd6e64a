"""Helpers shared by the benchmark scripts: machine facts, pinned subprocess runs, medians.

Every benchmark prints ratios measured in one run against a baseline measured in the same run
(DESIGN.md section 4). The machines these run on are small and shared, so:

* each measurement runs in its own process, pinned to one core (``taskset -c CPU``) with one
  torch thread, like the peer measurements in ``shared/peer-measurements.md``;
* candidates are interleaved (rep 1: A B C, rep 2: B C A, ...) so a burst of load from another
  process hits every candidate alike, and the reported value is the median over repetitions;
* ratios are the median of the per-repetition ratios (each against the baseline measured right
  next to it), which cancels slow drifts in machine load better than a ratio of medians.

This module imports no torch, so a worker process can set its thread count before torch loads.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RESULT_PREFIX = "RESULT "


def pin_prefix(cpu: int | None) -> list[str]:
    """``["taskset", "-c", "N"]`` when taskset exists and may use core N, else ``[]``."""
    if cpu is None or cpu < 0 or shutil.which("taskset") is None:
        return []
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return []
    return ["taskset", "-c", str(cpu)] if cpu in allowed else []


def single_thread_env(threads: int = 1) -> dict[str, str]:
    """Environment for a measured child: N OpenMP/MKL threads, no stray output buffering."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_child(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> Any:
    """Run a worker command and return the JSON it printed on its ``RESULT`` line.

    Raises:
        RuntimeError: the worker failed or printed no result (its output is included).
    """
    proc = subprocess.run(
        list(cmd), env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT)
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"worker {' '.join(cmd)} exited {proc.returncode} without a result\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )


def emit(result: Any) -> None:
    """Print a worker's result for :func:`run_child` (one JSON line)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def interleaved(names: Sequence[str], rep: int) -> list[str]:
    """The candidates rotated by ``rep``: each takes every position equally often."""
    k = rep % len(names)
    return list(names[k:]) + list(names[:k])


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of the repetitions, for the reader to judge the noise."""
    if not xs:
        return "-"
    return f"{min(xs):.3g}-{max(xs):.3g}"


def machine_facts(threads: int | None = None, pinning: str = "") -> str:
    """One paragraph of what the numbers depend on: date, CPU, torch, threads, load, pinning."""
    try:
        import importlib.metadata as md

        torch_version = md.version("torch")
    except Exception:
        torch_version = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load average ?"
    parts = [
        _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        f"{os.cpu_count()} cores ({cpu})",
        f"torch {torch_version}",
        f"python {platform.python_version()}",
        load,
    ]
    if threads is not None:
        parts.append(f"torch threads per measured process: {threads}")
    if pinning:
        parts.append(f"pinning: {pinning}")
    return "; ".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def python_for(module: str, candidates: Sequence[str | Path]) -> str | None:
    """The first interpreter (this one first) that can import ``module`` (found, not imported)."""
    seen = set()
    for exe in [sys.executable, *candidates]:
        exe = str(exe)
        if exe in seen or not Path(exe).exists():
            continue
        seen.add(exe)
        probe = (
            f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        )
        ok = subprocess.run([exe, "-c", probe], capture_output=True, timeout=120).returncode
        if ok == 0:
            return exe
    return None


def describe_pin(pin: Sequence[str], why_not: str = "taskset unavailable") -> str:
    return " ".join(pin) + " per measured process" if pin else f"none ({why_not})"

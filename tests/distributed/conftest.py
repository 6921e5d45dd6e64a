"""Fixtures for multi-process tests: free ports, and a torchrun launcher with a timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from runners import kiln_env

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_cmd(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *extra,
        *args,
    ]


@pytest.fixture
def torchrun() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``torchrun --standalone --nproc-per-node N ARGS``; every launch has a timeout."""

    def run(
        nproc: int, *args: str, timeout: float = 240, extra: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return run_group(torchrun_cmd(nproc, *args, extra=extra), timeout=timeout)

    return run


def start_group(cmd: list[str]) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own process group (see :func:`finish_group`)."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kiln_env(),
        start_new_session=True,
    )


def run_group(cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (no orphans)."""
    return finish_group(start_group(cmd), timeout=timeout)


def finish_group(
    proc: subprocess.Popen[str], *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc``; on timeout kill its whole process group and fail the test."""
    cmd = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout} s: {' '.join(cmd)}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

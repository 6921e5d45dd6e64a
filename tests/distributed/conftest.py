"""Fixtures for multi-process tests: free ports, and a torchrun launcher with a timeout."""

from __future__ import annotations

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
        return subprocess.run(
            torchrun_cmd(nproc, *args, extra=extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=kiln_env(),
        )

    return run

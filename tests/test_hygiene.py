"""The shared fixtures of ``tests/conftest.py`` hold: no environment variable or process group
leaks from one test into the next (DESIGN.md rule 13).

The tests come in pairs that pytest runs in file order: the first leaves something behind, the
second checks that it is gone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

_ADDED = "KILN_TEST_LEAK"
#: What the first test of a pair saw before it changed anything.
_seen: dict[str, str | None] = {}


def test_a_test_may_write_os_environ_directly() -> None:
    _seen.update(PATH=os.environ.get("PATH"), HOME=os.environ.get("HOME"))
    os.environ[_ADDED] = "1"  # added
    os.environ["PATH"] = "/nowhere"  # changed
    os.environ.pop("HOME", None)  # removed
    assert os.environ[_ADDED] == "1"


def test_the_next_test_sees_the_environment_as_it_was() -> None:
    assert _ADDED not in os.environ
    if _seen:  # the pair ran in order (not this test alone)
        assert os.environ.get("PATH") == _seen["PATH"]
        assert os.environ.get("HOME") == _seen["HOME"]


def test_a_test_may_leave_a_process_group(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    assert dist.is_initialized()


def test_the_next_test_starts_without_a_process_group() -> None:
    assert not dist.is_initialized()

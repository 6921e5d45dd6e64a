"""The CLI's error mapping: the user's mistakes are one line and exit 2, Kiln's bugs exit 1."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.cli.errors import EXIT_USAGE, run_cli, user_message
from kiln.config import ConfigError
from kiln.errors import (
    CorruptFileError,
    DiskError,
    KilnError,
    UnsafeFileError,
    UsageError,
    short_repr,
)
from kiln.train.checkpoint import CheckpointError
from kiln.train.guard import NonFiniteError


def _exit(fn, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_cli(fn, debug=False)
    return int(info.value.code), capsys.readouterr().err


def _raise(exc: BaseException):
    def fn():
        raise exc

    return fn


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("optim.lr must be > 0, got -1"),
        CheckpointError("checkpoint x.ckpt is corrupt"),
        NonFiniteError("loss is NaN at step 3"),
        CorruptFileError("model.safetensors is truncated"),
        UnsafeFileError("model.target 'os:system' is an import path read from a file"),
        UsageError("--port must be 0-65535, got 70000"),
    ],
)
def test_kiln_errors_are_one_line_exit_2(exc, capsys):
    code, err = _exit(_raise(exc), capsys)
    assert code == EXIT_USAGE
    assert err == f"error: {exc}\n"
    assert isinstance(exc, KilnError)


def test_value_error_from_inside_torch_is_a_bug(capsys):
    # Kiln passing a wrong shape to torch is Kiln's bug, not the user's: exit 1, "please report".
    code, err = _exit(lambda: torch.zeros(2, 3).view(4, 4), capsys)
    assert code == 1
    assert "bug in Kiln" in err and "please report" in err
    assert err.count("\n") == 1


def test_value_error_from_numpy_is_a_bug(capsys):
    code, _ = _exit(lambda: np.zeros(3).reshape(2, 2), capsys)
    assert code == 1


def test_value_error_written_by_kiln_is_the_users(capsys):
    from kiln.registry import import_object

    code, err = _exit(lambda: import_object("no_colon_here"), capsys)
    assert code == EXIT_USAGE
    assert "package.module:Name" in err


def test_disk_full_says_so_and_that_earlier_files_are_intact():
    exc = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-3.ckpt")
    msg = user_message(exc)
    assert msg is not None
    assert "disk is full" in msg and "step-3.ckpt" in msg and "intact" in msg
    assert user_message(DiskError("disk full")) == "disk full"


def test_named_missing_file_is_the_users(capsys):
    code, err = _exit(lambda: Path("/definitely/not/here.yaml").read_text(), capsys)
    assert code == EXIT_USAGE
    assert err.strip() == "error: No such file or directory: /definitely/not/here.yaml"


def test_recursion_error_is_one_line(capsys):
    def deep(n: int) -> int:
        return deep(n + 1)

    code, err = _exit(lambda: deep(0), capsys)
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and "nested too deeply" in err


def test_unexpected_message_is_cut_to_one_bounded_line(capsys):
    code, err = _exit(_raise(RuntimeError("x" * 5000 + "\nsecond line")), capsys)
    assert code == 1
    assert err.count("\n") == 1 and len(err) < 600


def test_short_repr_never_reprs_a_huge_value():
    bomb: list = []
    for _ in range(30):  # 2**30 leaves if expanded: repr would never finish
        bomb = [bomb, bomb]
    assert short_repr(bomb) == "list of 2 items (nested)"
    assert short_repr({str(i): i for i in range(100)}) == "dict of 100 items"
    assert len(short_repr("y" * 10**7)) == 80

"""Where a finding points: the ``file:line`` of the user's code, outside torch and the doctor.

The doctor's hooks and patches run inside torch's calls and its own; these helpers walk the
stack (or a traceback) out to the innermost frame in the user's code.

Example:
    >>> import os
    >>> short_path(os.path.join(os.getcwd(), "train.py"))
    'train.py'
"""

from __future__ import annotations

import inspect
import os
import sys
import sysconfig
from pathlib import Path
from types import FrameType
from typing import Any

import torch

__all__ = ["def_site", "in_torch", "short_path", "user_file", "user_site"]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_STDLIB_DIR = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep
# The doctor's own package: its frames (hooks, patches, the step loop) are never the site.
_DOCTOR_DIR = str(Path(__file__).resolve().parent) + os.sep


def in_torch(filename: str) -> bool:
    """Whether ``filename`` belongs to torch itself."""
    return filename.startswith(_TORCH_DIR)


def short_path(filename: str) -> str:
    """``filename`` relative to the working directory when it lies under it.

    Example:
        >>> short_path(os.path.join(os.getcwd(), "train.py"))
        'train.py'
    """
    return os.path.relpath(filename) if Path(filename).is_relative_to(os.getcwd()) else filename


def user_file(filename: str) -> bool:
    """Whether ``filename`` is the user's: not torch, the standard library or the doctor."""
    return not (
        in_torch(filename)
        or filename.startswith(_STDLIB_DIR)
        or filename.startswith(_DOCTOR_DIR)
        or filename.startswith("<frozen")
    )


def user_site(frame: FrameType | None = None) -> str:
    """``file:line`` of the innermost caller outside torch, the standard library and the doctor.

    Example:
        >>> user_site().startswith("<doctest")
        True
    """
    # sys._getframe(1), not inspect.currentframe(): a frame object of this function holding
    # its caller would be a reference cycle keeping the caller's locals (a loss) alive.
    f: FrameType | None = frame if frame is not None else sys._getframe(1)
    while f is not None:
        if user_file(f.f_code.co_filename):
            return f"{short_path(f.f_code.co_filename)}:{f.f_lineno}"
        f = f.f_back
    return "<unknown>"


def def_site(fn: Any) -> str:
    """``file:line`` where a function (or a callable object's ``__call__``) is defined."""
    target = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(target, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", type(fn).__name__)
    return f"{short_path(code.co_filename)}:{code.co_firstlineno}"

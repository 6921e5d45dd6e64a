"""Where a NaN or Inf is born: a forward guard per module, and autograd's anomaly mode.

A non-finite loss says only that something went wrong somewhere. Two tools say where:

* :class:`NonFiniteGuard` (from :mod:`kiln.train.nonfinite`, the mechanism the trainer's
  non-finite policy uses too) stops at the first module whose forward output holds a NaN or
  Inf; its :class:`NonFiniteReport` names the module, the step and what the module was given.
* :func:`detect_anomaly` adds ``torch.autograd`` anomaly mode for the backward pass: the first
  backward function that returns a NaN raises, and :class:`AnomalyError` names it together with
  the line of the forward code that created it (anomaly mode records a traceback per
  operation, so it is slow: turn it on to hunt a problem, not for whole runs).

Both are context managers that always remove their hooks and restore the anomaly setting, and
both work inside any training loop:

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.fill_(float("inf"))
    >>> for step in range(3):
    ...     try:
    ...         with detect_anomaly(net, step=step):
    ...             net(torch.ones(4, 2)).sum().backward()
    ...     except NonFiniteOutputError as err:
    ...         print(err.report.module, err.report.step)
    ...         break
    1 0
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kiln.train.nonfinite import (
    InputStats,
    NonFiniteGuard,
    NonFiniteOutputError,
    NonFiniteReport,
)

__all__ = [
    "AnomalyError",
    "InputStats",
    "NonFiniteGuard",
    "NonFiniteOutputError",
    "NonFiniteReport",
    "detect_anomaly",
]


class AnomalyError(RuntimeError):
    """Autograd anomaly mode found a backward function that failed or returned NaN.

    Attributes:
        operation: the backward function (``LogBackward0``).
        forward_line: the user code line of the forward operation that created it (``file:line:
            code``), or None when the traceback had none.
    """

    def __init__(self, message: str, operation: str, forward_line: str | None) -> None:
        super().__init__(message)
        self.operation = operation
        self.forward_line = forward_line


# "Error detected in LogBackward0. Traceback of forward call that caused the error: ..."
_DETECTED = re.compile(r"Error detected in (\S+?)\.\s+Traceback of forward call", re.S)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def _user_line(trace: str) -> str | None:
    """The last frame of a forward traceback outside torch itself: the user's operation."""
    frames = [
        f"{path}:{line}: {code.strip()}"
        for path, line, code in _FRAME.findall(trace)
        if "/torch/" not in path.replace("\\", "/")
    ]
    return frames[-1] if frames else None


@contextmanager
def detect_anomaly(
    model: nn.Module | None = None,
    *,
    step: int | None = None,
    check_nan: bool = True,
    raise_error: bool = True,
) -> Iterator[NonFiniteGuard | None]:
    """Autograd anomaly mode for the block, plus a :class:`NonFiniteGuard` on ``model``.

    Put one training step (forward and backward) in the block. The previous anomaly setting is
    restored on exit and the guard's hooks are removed, also on an exception.

    Args:
        model: the model to guard in the forward pass (None: anomaly mode only).
        step: the step number the guard reports.
        check_nan: make a backward function that returns NaN raise (autograd's ``check_nan``).
        raise_error: passed to the guard; False records the first non-finite output in
            ``guard.report`` without stopping.

    Yields:
        The guard (None without ``model``).

    Raises:
        NonFiniteOutputError: a module's forward output went non-finite (``raise_error``).
        AnomalyError: a backward function failed or returned NaN; it names the operation and
            the forward line that created it (the original error is its ``__cause__``).

    Example:
        >>> x = torch.zeros(1, requires_grad=True)
        >>> try:
        ...     with detect_anomaly():
        ...         (x * torch.log(x)).sum().backward()  # log's backward: 0 / x at x = 0
        ... except AnomalyError as err:
        ...     err.operation
        'LogBackward0'
    """
    guard = None if model is None else NonFiniteGuard(model, step=step, raise_error=raise_error)
    other: list[warnings.WarningMessage] = []
    try:
        with (
            torch.autograd.set_detect_anomaly(True, check_nan=check_nan),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            try:
                if guard is None:
                    yield None
                else:
                    with guard:
                        yield guard
            except NonFiniteOutputError:
                raise
            except RuntimeError as exc:
                found = [m for w in caught if (m := _DETECTED.search(str(w.message)))]
                if not found:
                    raise
                op = found[-1].group(1)
                line = _user_line(str(found[-1].string))
                at = f" (forward: {line})" if line else ""
                raise AnomalyError(
                    f"backward of {op}{at} failed: {str(exc).splitlines()[0]}", op, line
                ) from exc
            finally:
                other = [w for w in caught if not _DETECTED.search(str(w.message))]
    finally:
        # Warnings other than anomaly mode's own report go to the caller's filters as usual.
        for w in other:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)

"""Where a NaN or Inf is born: a forward guard per module, and autograd's anomaly mode.

A non-finite loss says only that something went wrong somewhere. Two tools say where:

* :class:`NonFiniteGuard` hooks every module's forward and stops at the first module (in
  execution order, innermost first) whose output holds a NaN or Inf. Its
  :class:`NonFiniteReport` names the module, the step, and the min/max/mean of the inputs that
  module received, which usually tells a bad input (huge values, an Inf already there) from a
  bad operation (``log(0)``, ``0 / 0``, an overflow in half precision).
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
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kiln.train.guard import NonFiniteError

__all__ = [
    "AnomalyError",
    "InputStats",
    "NonFiniteGuard",
    "NonFiniteOutputError",
    "NonFiniteReport",
    "detect_anomaly",
]

INPUT = "<input>"
"""The module name a report gives when the model's own input is not finite."""


@dataclass(frozen=True)
class InputStats:
    """Min, max and mean of one tensor a module received (non-finite values included).

    Example:
        >>> InputStats.of(torch.tensor([1.0, 3.0])).mean
        2.0
    """

    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    nonfinite: int

    @classmethod
    @torch.no_grad()
    def of(cls, t: torch.Tensor) -> InputStats:
        """The statistics of ``t`` (read as float32)."""
        x = t.detach().float()
        if x.numel() == 0:
            nan = float("nan")
            return cls(tuple(t.shape), str(t.dtype), nan, nan, nan, 0)
        bad = int((~torch.isfinite(x)).sum())
        return cls(
            tuple(t.shape), str(t.dtype), float(x.min()), float(x.max()), float(x.mean()), bad
        )

    def __str__(self) -> str:
        bad = f", {self.nonfinite} non-finite" if self.nonfinite else ""
        return (
            f"{list(self.shape)} {self.dtype.removeprefix('torch.')}: min {self.min:.4g}, "
            f"max {self.max:.4g}, mean {self.mean:.4g}{bad}"
        )


@dataclass(frozen=True)
class NonFiniteReport:
    """The first module whose output went non-finite, and what it was given.

    Attributes:
        module: its dotted name (``""`` for the model itself; ``"<input>"`` when the model's
            input already held NaN/Inf).
        type: its class name.
        step: the step the guard was at (None when not set).
        inputs: statistics of each tensor argument the module received.
        output_nonfinite: NaN/Inf elements in its output.
        output_numel: elements in its output.

    Example:
        >>> r = NonFiniteReport("fc", "Linear", 3, (), 2, 8)
        >>> str(r)
        "step 3: module 'fc' (Linear) output 2/8 non-finite values"
    """

    module: str
    type: str
    step: int | None
    inputs: tuple[InputStats, ...]
    output_nonfinite: int
    output_numel: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, JSON-ready."""
        return asdict(self)

    def __str__(self) -> str:
        where = f"step {self.step}: " if self.step is not None else ""
        if self.module == INPUT:
            head = f"{where}the model's input holds {self.output_nonfinite} NaN/Inf values"
        else:
            head = (
                f"{where}module {self.module!r} ({self.type}) output {self.output_nonfinite}/"
                f"{self.output_numel} non-finite values"
            )
        ins = "; ".join(f"input {i}: {s}" for i, s in enumerate(self.inputs))
        return f"{head}; {ins}" if ins else head


class NonFiniteOutputError(NonFiniteError):
    """A module's output held NaN/Inf under a raising :class:`NonFiniteGuard`.

    Attributes:
        report: where and what (:class:`NonFiniteReport`).
    """

    def __init__(self, report: NonFiniteReport) -> None:
        super().__init__(f"non-finite forward output: {report}")
        self.report = report


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


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _bad(tensors: list[torch.Tensor]) -> int:
    return sum(int((~torch.isfinite(t.detach())).sum()) for t in tensors if t.is_floating_point())


class NonFiniteGuard:
    """Forward hooks on every module that catch the first NaN/Inf output.

    Modules finish innermost first, so the first hit is the module that made the bad value, not
    a container around it. Checking costs one host sync per module per forward pass.

    Args:
        model: the model to watch.
        step: the step reported (set ``guard.step`` as the loop advances).
        raise_error: raise :class:`NonFiniteOutputError` at the first hit (stopping the
            forward there); otherwise only record it in ``guard.report`` and go on.

    Attributes:
        report: the first hit since entering (or :meth:`reset`), else None.
        step: the current step.

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
        >>> with NonFiniteGuard(net, raise_error=False) as guard:
        ...     for step, v in enumerate([1.0, float("nan")]):
        ...         guard.step = step
        ...         _ = net(torch.tensor([[v]]))
        >>> guard.report.module, guard.report.step
        ('<input>', 1)
    """

    def __init__(
        self, model: nn.Module, *, step: int | None = None, raise_error: bool = True
    ) -> None:
        self.model = model
        self.step = step
        self.raise_error = raise_error
        self.report: NonFiniteReport | None = None
        self._handles: list[Any] = []

    def reset(self) -> None:
        """Forget the recorded hit (to catch the next one in ``raise_error=False`` mode)."""
        self.report = None

    def _hit(self, report: NonFiniteReport) -> None:
        if self.report is None:
            self.report = report
            if self.raise_error:
                raise NonFiniteOutputError(report)

    def _check_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.report is not None:
            return
        tensors = _tensors(args)
        bad = _bad(tensors)
        if bad:
            stats = tuple(InputStats.of(t) for t in tensors)
            numel = sum(t.numel() for t in tensors)
            self._hit(NonFiniteReport(INPUT, type(module).__name__, self.step, stats, bad, numel))

    def _check_output(self, name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.report is not None:
            return
        outs = _tensors(out)
        bad = _bad(outs)
        if bad:
            stats = tuple(InputStats.of(t) for t in _tensors(args))
            numel = sum(t.numel() for t in outs)
            self._hit(NonFiniteReport(name, type(module).__name__, self.step, stats, bad, numel))

    def __enter__(self) -> NonFiniteGuard:
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(lambda m, a: self._check_input(m, a))
            )
            for name, module in self.model.named_modules():

                def hook(m: nn.Module, a: tuple[Any, ...], o: Any, name: str = name) -> None:
                    self._check_output(name, m, a, o)

                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self._remove()


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

"""Where a NaN or Inf is: which gradients, and the first module whose forward output holds one.

One mechanism for every caller: the trainer's non-finite policy (``train.nonfinite``) names the
module with :func:`first_nonfinite_module`, ``kiln inspect --anomaly`` and a user's own loop watch
every step with :class:`NonFiniteGuard` (re-exported by :mod:`kiln.inspect`).

* :class:`NonFiniteGuard` hooks every module's forward and stops at the first module (in
  execution order, innermost first) whose output holds a NaN or Inf. Its
  :class:`NonFiniteReport` names the module, the step, and the min/max/mean of the inputs that
  module received, which usually tells a bad input (huge values, an Inf already there) from a
  bad operation (``log(0)``, ``0 / 0``, an overflow in half precision).
* :func:`first_nonfinite_module` runs one forward pass under a guard and returns where it hit.
* :func:`nonfinite_grads` names the parameters whose gradients hold NaN/Inf.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> _ = nn.init.constant_(net[2].bias, float("nan"))
    >>> first_nonfinite_module(net, torch.ones(1, 2))
    ('2', 'Linear')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kiln.train.guard import NonFiniteError

__all__ = [
    "INPUT",
    "InputStats",
    "NonFiniteGuard",
    "NonFiniteOutputError",
    "NonFiniteReport",
    "first_nonfinite_module",
    "nonfinite_grads",
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


def nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of parameters whose gradient holds a NaN or Inf (one host sync per parameter).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> net(torch.tensor([[1.0, float("nan")]])).sum().backward()
        >>> nonfinite_grads(net)
        ['weight']
    """
    return [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, *inputs: Any) -> tuple[str, str] | None:
    """Run ``model(*inputs)`` under a :class:`NonFiniteGuard`: where the first NaN/Inf appeared.

    Returns:
        ``(name, class)`` of the first module, in execution order, whose output holds a NaN or
        Inf (``""`` for the model itself); ``(INPUT, class of the model)`` when the input already
        does; None when everything is finite. The hooks are always removed.

    Example:
        >>> first_nonfinite_module(nn.Linear(2, 1), torch.ones(1, 2)) is None
        True
    """
    with NonFiniteGuard(model, raise_error=False) as guard:
        model(*inputs)
    report = guard.report
    return None if report is None else (report.module, report.type)

"""Early stopping: stop when a monitored metric stops improving.

Example:
    >>> stop = EarlyStopping(mode="min", patience=2)
    >>> [stop.step(v) for v in (1.0, 0.9, 0.95, 0.91)]
    [False, False, False, True]
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Counts validations without an improvement of more than ``min_delta``.

    Args:
        mode: ``min`` (losses) or ``max`` (accuracies).
        patience: validations without improvement before :meth:`step` returns True.
        min_delta: an improvement must beat the best by more than this.
    """

    def __init__(self, *, mode: str = "min", patience: int = 5, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1 validations, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.mode, self.patience, self.min_delta = mode, patience, float(min_delta)
        self.best: float | None = None
        self.bad = 0  # validations since the last improvement

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.best is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float) -> bool:
        """Record one validation; True when training should stop."""
        if self.improved(value):
            self.best, self.bad = float(value), 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def check(self, monitor: str, val: dict[str, float]) -> str | None:
        """Record the validation metric named by ``monitor`` (``val/<name>``); why to stop or None.

        Raises:
            ValueError: ``monitor`` is not among the validation metrics.

        Example:
            >>> EarlyStopping(patience=1).check("val/loss", {"loss": float("nan")})[:14]
            'early stopping'
        """
        name = monitor.split("/", 1)[1]
        if name not in val:
            raise ValueError(
                f"early_stop.monitor={monitor!r} is not a validation metric; "
                f"available: {', '.join('val/' + k for k in val)}"
            )
        if not self.step(val[name]):
            return None
        return (
            f"early stopping: {monitor} did not improve by more than {self.min_delta:g} "
            f"for {self.patience} validations"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad = state["best"], int(state["bad"])

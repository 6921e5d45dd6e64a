"""Run logging: ``metrics.jsonl`` (one JSON object per line), TensorBoard, and a progress bar.

The progress bar is rich's, shown only on a terminal; it is refreshed at most every 0.2 s, so the
loop pays one ``time.monotonic()`` per batch for it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from kiln.run import METRICS


class MetricsLogger:
    """Appends metric dicts to ``metrics.jsonl`` and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = run_dir / METRICS
        self._file: Any = None
        self._tb: Any = None
        if not enabled:  # ranks other than 0 log nothing
            return
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        if self._file is None:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def epoch_line(
    epoch: int, epochs: int, step: int, metrics: dict[str, float], seconds: float
) -> str:
    """The line printed at the end of an epoch: where training is and the validation metrics.

    Example:
        >>> epoch_line(2, 5, 40, {"val/acc": 0.91234, "epoch": 2}, 1.25)
        'epoch 2/5  step 40  val/acc 0.9123  (1.2s)'
    """
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val/"))
    return f"epoch {epoch}/{epochs}  step {step}  {shown}  ({seconds:.1f}s)"


def train_record(
    loss: float, lr: float, grad_norm: Any, *, scaler_skips: int, nonfinite_skipped: int
) -> dict[str, float]:
    """The ``metrics.jsonl`` record of a logging step (``grad_norm``: a tensor or None).

    Example:
        >>> train_record(0.5, 0.1, None, scaler_skips=0, nonfinite_skipped=2)
        {'train/loss': 0.5, 'lr': 0.1, 'train/nonfinite_skipped': 2}
    """
    logs = {"train/loss": loss, "lr": lr}
    if grad_norm is not None:
        logs["train/grad_norm"] = grad_norm.item()
    if scaler_skips:  # fp16: updates the GradScaler skipped
        logs["train/skipped_updates"] = scaler_skips
    if nonfinite_skipped:  # train.nonfinite=skip
        logs["train/nonfinite_skipped"] = nonfinite_skipped
    return logs


def _jsonable(obj: Any) -> Any:
    return float(obj) if hasattr(obj, "__float__") else str(obj)


class Progress:
    """A rich progress bar over all updates of the run (loss, steps/s, ETA), TTY only."""

    def __init__(self, total: int, *, enabled: bool | str = "auto", initial: int = 0) -> None:
        self.enabled = sys.stdout.isatty() if enabled == "auto" else bool(enabled)
        self._bar: Any = None
        self._next = 0.0
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=initial, info="")
            self._t0, self._s0 = time.monotonic(), initial

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, info: dict[str, float] | None = None, force: bool = False) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + 0.2
        rate = (step - self._s0) / max(now - self._t0, 1e-9)
        text = f"{rate:6.1f} it/s"
        if info:
            text = "  ".join(f"{k} {v:.4g}" for k, v in info.items()) + "  " + text
        self._bar.update(self._task, completed=step, info=text)

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)

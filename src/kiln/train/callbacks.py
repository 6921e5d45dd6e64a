"""Callbacks: plain objects with optional ``on_<event>`` methods, called at fixed points.

They observe the run (log, save, stop early); they do not change the math (DESIGN.md rule 6).
The events, in the order :meth:`kiln.Trainer.fit` fires them, are listed in :data:`EVENTS`.
Dispatch is precomputed per event, so an event nobody listens to costs nothing in the loop.

Example:
    >>> class PrintLoss:
    ...     def on_log(self, trainer, metrics):
    ...         print(metrics["train/loss"])
    >>> cbs = Callbacks([PrintLoss()])
    >>> cbs.fire("on_log", None, {"train/loss": 0.5})
    0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

EVENTS = (
    "on_fit_start",  # (trainer)                     after setup/resume, before the first batch
    "on_epoch_start",  # (trainer, epoch)             epoch: 0-based index of the epoch to run
    "on_update_end",  # (trainer, step)              after each optimizer update
    "on_log",  # (trainer, metrics)                  every train.log_every updates
    "on_validation_end",  # (trainer, metrics)       after each validation pass
    "on_checkpoint",  # (trainer, path)              after a checkpoint is written
    "on_epoch_end",  # (trainer, epoch, metrics)    epoch: epochs done (1 after the first)
    "on_fit_end",  # (trainer, result)               after the final save
    "on_exception",  # (trainer, exc)                on any error or interrupt, before re-raise
)


class Callbacks:
    """The callbacks of one run, grouped by event for cheap dispatch."""

    def __init__(self, callbacks: Sequence[object] = ()) -> None:
        self.items = list(callbacks)
        self._by_event: dict[str, list[Callable[..., Any]]] = {e: [] for e in EVENTS}
        for cb in self.items:
            names = [n for n in dir(cb) if n.startswith("on_")]
            for n in names:
                if n not in self._by_event:
                    raise ValueError(
                        f"{type(cb).__name__}.{n} is not a Kiln event; events: {', '.join(EVENTS)}"
                    )
                self._by_event[n].append(getattr(cb, n))

    def has(self, event: str) -> bool:
        return bool(self._by_event[event])

    def fire(self, event: str, *args: Any) -> None:
        for fn in self._by_event[event]:
            fn(*args)

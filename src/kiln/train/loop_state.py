"""Where a fit is: the loop's counters, saved in every checkpoint and restored on resume.

Everything the loop changes as it runs and that a resumed run must continue from lives in one
:class:`LoopState`, not in loose attributes. Its :meth:`LoopState.state_dict` is the
checkpoint's ``loop`` entry (the format since the first checkpoints, so old ones still load);
``best`` and ``resumed_from`` are kept beside it at the checkpoint's top level.

Example:
    >>> s = LoopState(epoch=1, batch_in_epoch=3, step=8)
    >>> s.state_dict()["batch"]
    3
    >>> LoopState.from_state(s.state_dict()).step
    8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.train import distributed

__all__ = ["LoopState", "StopRequest"]


@dataclass
class LoopState:
    """The counters of one fit.

    Attributes:
        epoch: the current epoch (0-based).
        batch_in_epoch: loader batches of this epoch already trained on.
        step: optimizer updates so far (a skipped non-finite update's slot counts too).
        micro: micro-batches per loader batch (auto-microbatch doubles it on out-of-memory).
        lr_scale: the LR factor that non-finite rollbacks applied.
        rollbacks: non-finite rollbacks so far.
        nonfinite_skipped: non-finite updates skipped so far (``train.nonfinite=skip``).
        skip_streak: ``(engine.updates at the last skip, skips in a row)``; not saved.
        best: ``{"step": N, monitor: value}`` of the best checkpoint so far.
        resumed_from: the step each resume of this run started at, in order.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    micro: int = 1
    lr_scale: float = 1.0
    rollbacks: int = 0
    nonfinite_skipped: int = 0
    skip_streak: tuple[int, int] = (-1, 0)
    best: dict[str, float] = field(default_factory=dict)
    resumed_from: list[int] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``loop`` entry (``best`` and ``resumed_from`` are stored beside it)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch_in_epoch,
            "step": self.step,
            "micro": self.micro,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(
        self,
        loop: dict[str, Any],
        *,
        best: dict[str, float] | None = None,
        resumed_from: list[int] | None = None,
    ) -> None:
        """Continue from a checkpoint's ``loop`` entry (keys added later default as they were)."""
        self.epoch, self.batch_in_epoch, self.step = loop["epoch"], loop["batch"], loop["step"]
        self.micro = int(loop.get("micro", 1))
        self.lr_scale = float(loop.get("lr_scale", 1.0))
        self.rollbacks = int(loop.get("rollbacks", 0))
        self.nonfinite_skipped = int(loop.get("nonfinite_skipped", 0))
        self.best = dict(best or {})
        if resumed_from is not None:
            self.resumed_from = list(resumed_from)

    def record_best(self, monitor: str, metric: float | None, mode: str) -> None:
        """Make ``metric`` (of ``monitor``, at ``self.step``) the best when it beats the best.

        Example:
            >>> s = LoopState(step=4, best={"step": 2, "val/loss": 0.5})
            >>> s.record_best("val/loss", 0.4, "min"); s.best
            {'step': 4, 'val/loss': 0.4}
        """
        old = self.best.get(monitor)
        if metric is not None and (
            old is None or (metric < old if mode == "min" else metric > old)
        ):
            self.best = {"step": self.step, monitor: metric}

    @classmethod
    def from_state(cls, loop: dict[str, Any], *, best: dict[str, float] | None = None) -> LoopState:
        """A new state continuing from a checkpoint's ``loop`` entry."""
        state = cls()
        state.load_state_dict(loop, best=best)
        return state


@dataclass
class StopRequest:
    """Whether the loop was asked to stop, and why (not saved: a resume starts unasked).

    Example:
        >>> stop = StopRequest()
        >>> stop.request("early stopping")
        >>> stop.reason, stop.interrupt
        ('early stopping', False)
    """

    reason: str | None = None
    interrupt: bool = False  # save a checkpoint and raise TrainingInterrupted

    def request(self, reason: str = "request", *, interrupt: bool = False) -> None:
        self.reason = reason
        self.interrupt = self.interrupt or interrupt

    def agree(self, world: int, device: torch.device) -> bool:
        """Whether to stop now; under several processes every rank agrees (one all-reduce).

        Called at logging steps and epoch ends only, so there is no per-step host sync.
        """
        if world == 1:
            return self.reason is not None
        flags = [1.0 if self.reason else 0.0, 1.0 if self.interrupt else 0.0]
        agreed = distributed.all_reduce_max(torch.tensor(flags, device=device))
        stop, interrupt = (bool(v) for v in agreed.tolist())
        if stop and not self.reason:
            self.reason = "another rank's stop request"
        self.interrupt = interrupt
        return stop

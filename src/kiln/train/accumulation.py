"""Gradient accumulation, decided here once: which micro-steps update, and the exact weights.

The schedule (DESIGN.md rule 4): micro-step ``i`` (0-based) of a pass over ``n`` micro-batches
ends its group, and so updates, when ``(i + 1) % k == 0`` or it is the last one
(:func:`ends_group`); a group holds ``k`` micro-batches except a partial last one
(:func:`group_length`); a pass takes ``ceil(n / k)`` updates (:func:`updates_per_pass`). The
:class:`~kiln.train.engine.Engine` applies these; every loop asks the Engine
(``is_update``, ``starts_group``, ``updates_per_pass``) rather than repeating the arithmetic.

Weights:

Accumulating ``k`` micro-batches must give the gradient of one big batch: the mean loss over
every sample of the group. Each micro-batch's mean loss therefore needs the factor
``samples in it / samples in the group``, but the group's total is only known at its end (a short
last batch, a loader of unknown length). :class:`GroupWeights` multiplies each loss by
``size / expected`` (``expected``: the samples of a full group, guessed at the group's start) and,
at the update, gives the factor ``expected / actual`` that turns the accumulated gradient into the
exact mean. For full groups of equal batches the guess is right and the factor is exactly 1.0, so
the common case costs nothing and matches ``loss / k`` bit for bit.

Example:
    >>> w = GroupWeights(accumulate=2)
    >>> w.factor(8, update=False), w.backward()
    (0.5, None)
    >>> w.factor(4, update=True), w.backward()  # a short last batch
    (0.25, None)
    >>> w.correction()  # grads * 16/12: the mean over the 12 samples
    1.3333333333333333
    >>> [ends_group(i, 5, 2) for i in range(5)], updates_per_pass(5, 2)
    ([False, True, False, True, True], 3)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "GroupWeights",
    "MicroStep",
    "ends_group",
    "group_length",
    "leading_size",
    "starts_group",
    "updates_per_pass",
]


def ends_group(i: int, n: int | None, k: int) -> bool:
    """Whether micro-step ``i`` of ``n`` (None: unknown) ends its group of ``k``: an update."""
    return (i + 1) % k == 0 or (n is not None and i == n - 1)


def starts_group(i: int, k: int) -> bool:
    """Whether micro-step ``i`` is the first of its group of ``k``."""
    return i % k == 0


def group_length(i: int, n: int | None, k: int) -> int:
    """Micro-batches in the group of micro-step ``i``: ``k``, fewer for a partial last group."""
    if n is None:
        return k
    return min(k, n - (i // k) * k)


def updates_per_pass(n: int, k: int) -> int:
    """Updates a pass over ``n`` micro-batches takes: one per group, a partial last one too."""
    return -(-n // k)


class GroupWeights:
    """The samples of the current accumulation group and the loss factor of each micro-batch.

    Args:
        accumulate: micro-batches per full group.

    Attributes:
        unit: samples in a full micro-batch: the first size seen (saved with the Engine's state,
            so a resumed run weighs like the uninterrupted one).
        samples: samples back-propagated in the current group.
        steps: micro-batches back-propagated in the current group (0: no pending gradient).
    """

    def __init__(self, accumulate: int) -> None:
        self.accumulate = accumulate
        self.unit: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current group (its gradients were applied or dropped)."""
        self.samples = 0
        self.steps = 0
        self.expected = 0  # the samples the loss factors of this group divide by
        self.explicit: bool | None = None  # whether this group's caller passes ``weight=``
        self._next = 0

    def factor(
        self, size: int | None, *, update: bool, weight: float | None = None, planned: int = 0
    ) -> float:
        """The loss factor of the micro-batch about to run.

        Args:
            size: samples in it (None: unknown, counted as a full micro-batch).
            update: whether it ends the group.
            weight: the caller's own factor (then no correction is made for this group).
            planned: micro-batches the group will hold when the caller knows it (0: ``accumulate``).
        """
        explicit = weight is not None
        if self.explicit is not None and self.explicit != explicit and self.steps:
            raise ValueError(
                "micro_step(weight=...) was given for some micro-batches of an accumulation group "
                "and not for others; pass weight= for all of them or for none (the default "
                "weighs each micro-batch by its number of samples)"
            )
        self.explicit = explicit
        if size is not None and size < 1:
            raise ValueError(f"micro_step(size=...) must be >= 1 samples, got {size}")
        if self.unit is None:
            self.unit = size or 1
        n = size or self.unit
        self._next = n
        if weight is not None:
            return weight
        if not self.steps:  # the group starts here: guess its total
            self.expected = n if update else (planned or self.accumulate) * self.unit
        return n / self.expected

    def backward(self) -> None:
        """Count the micro-batch whose factor was asked last (its gradient is now accumulated)."""
        self.samples += self._next
        self.steps += 1

    def correction(self) -> float:
        """Factor for the accumulated gradients at the update: ``expected / actual`` samples."""
        if self.explicit or not self.samples or self.samples == self.expected:
            return 1.0
        return self.expected / self.samples

    def state_dict(self) -> dict[str, Any]:
        return {"unit": self.unit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unit = state.get("unit")
        self.reset()


def leading_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a (nested) batch; None when there is none."""
    if type(batch) in (tuple, list) and batch and type(batch[0]) is torch.Tensor:
        first = batch[0]  # the usual (x, y) batch: no recursion
        if first.dim():
            return int(first.shape[0])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, (tuple, list)):
        items: Any = batch
    elif isinstance(batch, dict):
        items = batch.values()
    else:
        return None
    for item in items:
        found = leading_size(item)
        if found is not None:
            return found
    return None


class MicroStep:
    """The reusable context :meth:`Engine.micro_step` returns (no generator per step)."""

    __slots__ = ("_ctx", "sync", "update")

    def __init__(self) -> None:
        self.update = True
        self.sync: Any = None
        self._ctx: Any = None

    def __enter__(self) -> bool:
        if self.sync is not None:
            self._ctx = self.sync()
            self._ctx.__enter__()
        return self.update

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(*exc)

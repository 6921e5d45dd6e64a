"""Auto-microbatching: on out-of-memory, halve the micro-batch and replay the group.

:class:`AutoMicrobatch` (``train.auto_microbatch``) holds what a replay needs: the current
accumulation group's batches and the RNG state at its start. The train step
(``kiln.train.step``) records each group with it and, on out-of-memory, asks it to shrink and
replay.
:func:`is_out_of_memory` tells an allocator failure from other errors on every device: CUDA
raises ``torch.OutOfMemoryError``, but the CPU allocator raises a plain ``RuntimeError``
("DefaultCPUAllocator: can't allocate memory: ...").

Example:
    >>> import torch
    >>> try:
    ...     torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: no machine has it
    ... except RuntimeError as exc:
    ...     is_out_of_memory(exc)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["AutoMicrobatch", "is_out_of_memory"]

Batch = tuple[int, torch.Tensor, torch.Tensor]

# What the allocators say when they fail: CUDA/MPS/XPU ("... out of memory ..."), the CPU
# allocator ("DefaultCPUAllocator: can't allocate memory: ... Error code 12 (Cannot allocate
# memory)"), and the OS's ENOMEM text.
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory failure (on any device).

    Example:
        >>> is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXTS)


def _rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _rng_restore(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class AutoMicrobatch:
    """Halves the micro-batch on out-of-memory and replays the accumulation group so far.

    The group is replayed from its start (same RNG state, same mixed batches) with the smaller
    micro-batch, so the result equals a run that used it from the beginning.

    Args:
        per_rank_batch: examples in one loader batch.
        accumulate: loader batches per update (only for the message).
        say: where the "continuing with micro-batch N" line goes (None: nowhere).

    Example:
        >>> auto = AutoMicrobatch(8, accumulate=1)
        >>> auto.start_group(losses_len=0)
        >>> auto.add(0, torch.zeros(8, 2), torch.zeros(8))
        >>> calls = []
        >>> def run(i, x, y, micro):
        ...     calls.append(micro)
        ...     return True
        >>> auto.shrink_and_replay(1, run, drop=lambda: None, losses=[])
        (2, True)
        >>> calls
        [2]
    """

    def __init__(
        self, per_rank_batch: int, *, accumulate: int, say: Callable[[str], None] | None = None
    ) -> None:
        self.per_rank_batch, self.accumulate, self.say = per_rank_batch, accumulate, say
        self.group: list[Batch] = []  # the current group's (i, x, y), mixed
        self.rng: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None  # at its start
        self.losses_mark = 0  # length of the losses list at its start

    def start_group(self, losses_len: int) -> None:
        """A new accumulation group starts: remember the RNG state and the losses so far."""
        self.group = []
        self.rng = _rng_snapshot()
        self.losses_mark = losses_len

    def add(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Loader batch ``i`` (as it enters forward) joins the group."""
        self.group.append((i, x, y))

    def shrink_and_replay(
        self,
        micro: int,
        run: Callable[[int, torch.Tensor, torch.Tensor, int], bool],
        *,
        drop: Callable[[], None],
        losses: list[torch.Tensor],
    ) -> tuple[int, bool]:
        """Double the micro-batches per loader batch until the group fits; replay it.

        Args:
            micro: micro-batches per loader batch that ran out of memory.
            run: forward and backward of one loader batch ``(i, x, y, micro)``; True when it
                ends the group.
            drop: drops the group's gradients (``engine.zero_grad(optimizer)``).
            losses: the detached losses since the last log; the group's are dropped too.

        Returns:
            The new micro-batch count, and whether the replayed group's last batch updates.

        Raises:
            RuntimeError: out of memory even with a micro-batch of one example.
        """
        while True:
            drop()  # the group restarts: its gradients go too
            del losses[self.losses_mark :]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = math.ceil(self.per_rank_batch / micro)
            if size <= 1:
                raise RuntimeError(
                    "out of memory even with a micro-batch of 1 example; use a smaller model, "
                    "precision=bf16, train.activation_checkpointing=true, or more memory"
                )
            micro *= 2
            new = math.ceil(self.per_rank_batch / micro)
            if self.say is not None:
                self.say(
                    f"out of memory at micro-batch {size}: continuing with micro-batch {new} "
                    f"x {micro * self.accumulate} accumulation (same effective batch)"
                )
            assert self.rng is not None  # taken at the group's first batch
            _rng_restore(self.rng)
            try:
                update = False
                for i, x, y in self.group:
                    update = run(i, x, y, micro)
                return micro, update
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise

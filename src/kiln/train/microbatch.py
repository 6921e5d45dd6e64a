"""Auto-microbatching: on out-of-memory, halve the micro-batch and replay the group.

Called by the Trainer (``train.auto_microbatch``) with itself as the first argument.
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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kiln.train.trainer import Trainer

__all__ = ["forward_backward_or_shrink", "is_out_of_memory"]

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


def forward_backward_or_shrink(
    self: Trainer, i: int, x: torch.Tensor, y: torch.Tensor, losses: list[torch.Tensor]
) -> bool:
    """``Trainer._forward_backward``, halving the micro-batch on out-of-memory.

    The accumulation group so far is replayed from its start (same RNG state, same mixed
    batches) with the smaller micro-batch, so the result equals a run that used it from the
    beginning.
    """
    if i % self.engine.accumulate == 0 or not self._group:
        self._group = []
        self._group_rng = _rng_snapshot()
        self._group_losses = len(losses)
    self._group.append((i, x, y))
    try:
        return self._forward_backward(i, x, y, losses)
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
        if not is_out_of_memory(exc):
            raise
    while True:
        self.engine.zero_grad(self.optimizer)  # the group restarts: its gradients go too
        del losses[self._group_losses :]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = math.ceil(self.per_rank_batch / self.micro)
        if size <= 1:
            raise RuntimeError(
                "out of memory even with a micro-batch of 1 example; use a smaller model, "
                "precision=bf16, train.activation_checkpointing=true, or more memory"
            )
        self.micro *= 2
        new = math.ceil(self.per_rank_batch / self.micro)
        if self.verbose and self.is_zero:
            print(
                f"out of memory at micro-batch {size}: continuing with micro-batch {new} "
                f"x {self.micro * self.engine.accumulate} accumulation (same effective batch)",
                flush=True,
            )
        assert self._group_rng is not None  # taken at the group's first batch
        _rng_restore(self._group_rng)
        try:
            update = False
            for ii, xx, yy in self._group:
                update = self._forward_backward(ii, xx, yy, losses)
            return update
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise

"""Task distributions for meta-learning: batches of small regression problems.

A meta-learner trains on *tasks*, not examples: each task is a tiny dataset split into a
*support* set (the K examples it adapts on) and a *query* set (where the adapted model is
scored). :class:`TaskBatch` holds a stack of tasks along a leading task dimension, so the
algorithms in :mod:`kiln.meta.maml` can ``vmap`` over it.

:class:`SineTasks` is the sine-wave regression of Finn et al. 2017 ("Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks"): ``y = A sin(x - phi)`` with the amplitude
``A`` in [0.1, 5.0], the phase ``phi`` in [0, pi] and inputs ``x`` in [-5, 5], all uniform. Every
draw takes an explicit ``torch.Generator``, so task streams are reproducible and independent of
the global RNG (seeding the model's initialisation does not change the tasks, and vice versa).

Example:
    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> batch = SineTasks().sample(25, shots=10, query=15, generator=gen)
    >>> batch.support_x.shape, batch.query_y.shape
    (torch.Size([25, 10, 1]), torch.Size([25, 15, 1]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["SineTasks", "TaskBatch"]


class TaskBatch(NamedTuple):
    """A stack of tasks: support and query examples, task first.

    Attributes:
        support_x: ``(tasks, shots, *input_shape)`` inputs the model adapts on.
        support_y: ``(tasks, shots, *target_shape)`` their targets.
        query_x: ``(tasks, query, *input_shape)`` inputs the adapted model is scored on.
        query_y: ``(tasks, query, *target_shape)`` their targets.

    Example:
        >>> import torch
        >>> b = TaskBatch(*(torch.zeros(2, 3, 1) for _ in range(4)))
        >>> b.num_tasks, b.to(torch.device("cpu")).support_x.shape
        (2, torch.Size([2, 3, 1]))
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        """The size of the leading task dimension."""
        return int(self.support_x.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> TaskBatch:
        """The same tasks on ``device`` (and in ``dtype`` when given)."""
        return TaskBatch(*(t.to(device=device, dtype=dtype) for t in self))


@dataclass(frozen=True)
class SineTasks:
    """Sine-wave regression tasks ``y = amplitude * sin(x - phase)`` (Finn et al. 2017).

    Args:
        amplitude: uniform range of the amplitude.
        phase: uniform range of the phase, in radians.
        x_range: uniform range of the inputs.

    Example:
        >>> import torch
        >>> tasks = SineTasks()
        >>> a = tasks.sample(3, shots=5, query=5, generator=torch.Generator().manual_seed(1))
        >>> b = tasks.sample(3, shots=5, query=5, generator=torch.Generator().manual_seed(1))
        >>> bool(torch.equal(a.query_y, b.query_y))
        True
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("amplitude", "phase", "x_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(
                    f"SineTasks.{name} must be (low, high) with low <= high, got {(low, high)}"
                )

    def sample(
        self,
        num_tasks: int,
        *,
        shots: int,
        query: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> TaskBatch:
        """Draw ``num_tasks`` tasks with ``shots`` support and ``query`` query points each.

        Args:
            num_tasks: tasks in the batch.
            shots: support examples per task (K).
            query: query examples per task.
            generator: the CPU generator every draw comes from.
            dtype: floating dtype of the tensors.

        Returns:
            A :class:`TaskBatch` on the CPU with inputs and targets of shape ``(tasks, n, 1)``.

        Raises:
            ValueError: a count below 1.

        Example:
            >>> import torch
            >>> b = SineTasks().sample(4, shots=2, query=3, generator=torch.Generator())
            >>> b.support_y.shape
            torch.Size([4, 2, 1])
        """
        for name, n in (("num_tasks", num_tasks), ("shots", shots), ("query", query)):
            if n < 1:
                raise ValueError(f"{name} must be at least 1, got {n}")
        amp, phase = self.sample_parameters(num_tasks, generator=generator, dtype=dtype)
        x = _uniform((num_tasks, shots + query, 1), self.x_range, generator, dtype)
        y = self.target(x, amp, phase)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def sample_parameters(
        self, num_tasks: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitudes and phases of ``num_tasks`` tasks, each of shape ``(num_tasks,)``.

        Example:
            >>> import torch
            >>> amp, phase = SineTasks().sample_parameters(100, generator=torch.Generator())
            >>> bool(amp.min() >= 0.1 and amp.max() <= 5.0)
            True
        """
        amp = _uniform((num_tasks,), self.amplitude, generator, dtype)
        phase = _uniform((num_tasks,), self.phase, generator, dtype)
        return amp, phase

    @staticmethod
    def target(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """``amplitude * sin(x - phase)`` with one amplitude and phase per task (dim 0 of ``x``).

        Example:
            >>> import torch
            >>> SineTasks.target(torch.zeros(1, 1, 1), torch.tensor([2.0]), torch.tensor([0.0]))
            tensor([[[0.]]])
        """
        shape = (-1,) + (1,) * (x.dim() - 1)
        return amplitude.view(shape) * torch.sin(x - phase.view(shape))


def _uniform(
    shape: tuple[int, ...],
    bounds: tuple[float, float],
    generator: torch.Generator,
    dtype: torch.dtype,
) -> torch.Tensor:
    low, high = bounds
    return torch.empty(shape, dtype=dtype).uniform_(low, high, generator=generator)

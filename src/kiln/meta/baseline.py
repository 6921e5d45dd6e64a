"""The baseline MAML is measured against: one model pretrained on all tasks at once.

Finn et al. 2017 compare MAML with a network trained by ordinary regression on examples pooled
from many tasks, then fine-tuned on each test task with the same inner steps and learning rate.
On the sine tasks that model learns roughly the average curve over amplitudes and phases, which a
few gradient steps move only a little towards a particular task; MAML instead learns a starting
point that those few steps move far.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from kiln.meta.tasks import SineTasks
    >>> net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    >>> losses = pretrain_joint(net, opt, SineTasks().sample, steps=5, tasks_per_step=4,
    ...                         shots=10, query=10, generator=torch.Generator().manual_seed(0))
    >>> len(losses)
    5
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.meta.maml import LossFn
from kiln.meta.tasks import TaskBatch

__all__ = ["TaskSampler", "pretrain_joint"]

TaskSampler = Callable[..., TaskBatch]
"""``sampler(num_tasks, shots=, query=, generator=) -> TaskBatch``, e.g. ``SineTasks().sample``."""


def pretrain_joint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sample: TaskSampler,
    *,
    steps: int,
    tasks_per_step: int,
    shots: int,
    query: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    loss_fn: LossFn = F.mse_loss,
    log: Callable[[int, torch.Tensor], None] | None = None,
) -> list[float]:
    """Train ``model`` by plain regression on points pooled from freshly drawn tasks.

    Each update draws ``tasks_per_step`` tasks exactly as a MAML meta-batch would and fits all
    their support and query examples together, so both see the same examples per update.

    Args:
        model: the network, trained in place.
        optimizer: its optimizer.
        sample: the task sampler (e.g. ``SineTasks().sample``).
        steps: optimizer updates.
        tasks_per_step: tasks drawn per update.
        shots: support examples per task (pooled with the query examples).
        query: query examples per task.
        generator: the generator every task draw comes from.
        device: where the examples go (default: the model's device).
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        log: called as ``log(step, loss)`` after each update (``loss`` stays on the device).

    Returns:
        The training loss of every update (read from the device once, at the end).
    """
    device = device or next(model.parameters()).device
    losses = []
    for step in range(1, steps + 1):
        tasks = sample(tasks_per_step, shots=shots, query=query, generator=generator)
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1).flatten(0, 1).to(device)
        y = torch.cat([tasks.support_y, tasks.query_y], dim=1).flatten(0, 1).to(device)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if log is not None:
            log(step, losses[-1])
    return torch.stack(losses).tolist() if losses else []

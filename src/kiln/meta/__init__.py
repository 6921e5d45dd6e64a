"""Meta-learning: MAML and first-order MAML with ``torch.func``, task distributions, a runner.

``kiln.meta.maml`` holds the algorithm as pure functions of a module and a parameter dict,
``kiln.meta.tasks`` the sine-wave task distribution of Finn et al. 2017, ``kiln.meta.baseline``
the jointly pretrained model MAML is compared with, and ``kiln.meta.runner`` the job that
``kiln train`` runs when ``meta.enabled=true``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from kiln.meta import SineTasks, meta_gradient, params_of
    >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
    >>> batch = SineTasks().sample(25, shots=10, query=10, generator=torch.Generator())
    >>> grads, loss = meta_gradient(net, params_of(net), batch, steps=1, lr=0.01)
    >>> grads["0.weight"].shape
    torch.Size([40, 1])
"""

from __future__ import annotations

from kiln.meta.baseline import pretrain_joint
from kiln.meta.maml import (
    adapt,
    adaptation_losses,
    check_functional,
    meta_gradient,
    meta_loss,
    params_of,
    task_query_loss,
)
from kiln.meta.tasks import SineTasks, TaskBatch

__all__ = [
    "SineTasks",
    "TaskBatch",
    "adapt",
    "adaptation_losses",
    "check_functional",
    "meta_gradient",
    "meta_loss",
    "params_of",
    "pretrain_joint",
    "task_query_loss",
]

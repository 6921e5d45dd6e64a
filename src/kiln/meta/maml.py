"""Model-Agnostic Meta-Learning (Finn et al. 2017) with ``torch.func``.

MAML learns an initialisation ``theta`` from which a few gradient steps on a new task's support
set give a good model for that task. For one task with support loss ``L_s`` and query loss
``L_q``, one inner step is ``theta' = theta - lr * grad L_s(theta)`` and the meta-objective is
``L_q(theta')``. Its gradient is::

    d L_q(theta') / d theta = (I - lr * H_s(theta)) @ grad L_q(theta')      (one inner step)

where ``H_s`` is the Hessian of the support loss. *Second-order* MAML keeps the Hessian term
(gradients flow through the inner gradient); *first-order* MAML (FOMAML) treats the inner
gradient as a constant, so the meta-gradient is just ``grad L_q`` evaluated at ``theta'``.

Everything here is a pure function of a module and a dict of parameters:
``torch.func.functional_call`` runs the module with any parameters, ``torch.func.grad`` gives
the inner gradient (differentiable, so an outer ``grad`` sees through it), and
``torch.func.vmap`` runs all tasks of a meta-batch at once. The module itself is never changed;
the caller writes the meta-gradient into ``.grad`` and steps its optimizer.

Models must be free of randomness and running statistics under ``vmap`` (no dropout, no
BatchNorm buffers); :func:`check_functional` says so up front.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from kiln.meta.tasks import SineTasks
    >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
    >>> batch = SineTasks().sample(5, shots=10, query=10, generator=torch.Generator())
    >>> grads, loss = meta_gradient(net, params_of(net), batch, steps=1, lr=0.01)
    >>> sorted(grads) == sorted(n for n, _ in net.named_parameters()), loss.dim()
    (True, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from kiln.meta.tasks import TaskBatch

__all__ = [
    "LossFn",
    "Params",
    "adapt",
    "adaptation_losses",
    "check_functional",
    "meta_gradient",
    "meta_loss",
    "params_of",
    "task_query_loss",
]

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def params_of(model: nn.Module) -> Params:
    """The model's parameters by name, detached: the input of the functional calls below.

    Example:
        >>> from torch import nn
        >>> sorted(params_of(nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    return {name: p.detach() for name, p in model.named_parameters()}


def check_functional(model: nn.Module) -> None:
    """Refuse modules that cannot run per task under ``vmap``.

    Raises:
        ValueError: the model has buffers (BatchNorm running statistics) or active dropout.

    Example:
        >>> from torch import nn
        >>> check_functional(nn.Sequential(nn.Linear(1, 4), nn.Tanh()))
        >>> check_functional(nn.BatchNorm1d(4))
        Traceback (most recent call last):
        ...
        ValueError: meta-learning needs a model without buffers; found running_mean, ...
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        shown = ", ".join(buffers[:1]) + (", ..." if len(buffers) > 1 else "")
        raise ValueError(
            f"meta-learning needs a model without buffers; found {shown} (BatchNorm running "
            "statistics mix tasks together); use model.kwargs.norm=none or norm=layer"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ValueError(
                f"meta-learning needs a deterministic model; {name or 'the model'} is dropout "
                f"with p={module.p}; use model.kwargs.dropout=0"
            )


def adapt(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    loss_fn: LossFn = F.mse_loss,
) -> Params:
    """``steps`` plain gradient-descent steps on one task's support set, from ``params``.

    The result stays a differentiable function of ``params``: under an outer ``torch.func.grad``
    (or with ``params`` that require grad) the meta-gradient flows through every inner step,
    Hessian-vector products included. With ``first_order`` the inner gradients are detached, so
    each step only shifts the parameters by a constant.

    Args:
        model: the network; only its structure is used, never its own parameters.
        params: parameters by name (see :func:`params_of`).
        x: support inputs of one task, ``(shots, *input_shape)``.
        y: support targets, ``(shots, *target_shape)``.
        steps: inner gradient steps (0 returns ``params``).
        lr: inner learning rate.
        first_order: drop the second-order terms (FOMAML).
        loss_fn: ``loss_fn(prediction, target) -> scalar``.

    Returns:
        The adapted parameters by name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(1, 1)
        >>> p = params_of(net)
        >>> x = torch.randn(8, 1)
        >>> new = adapt(net, p, x, 3 * x, steps=20, lr=0.3)
        >>> bool(F.mse_loss(net(x), 3 * x) > F.mse_loss(functional_call(net, new, (x,)), 3 * x))
        True
    """

    def support_loss(p: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    for _ in range(steps):
        grads = grad(support_loss)(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = {k: params[k] - lr * grads[k] for k in params}
    return params


def task_query_loss(
    model: nn.Module,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    loss_fn: LossFn = F.mse_loss,
) -> torch.Tensor:
    """One task's query loss after adapting ``params`` on its support set.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net, x = nn.Linear(1, 1), torch.randn(4, 1)
        >>> task_query_loss(net, params_of(net), x, x, x, x, steps=1, lr=0.1).shape
        torch.Size([])
    """
    adapted = adapt(
        model,
        params,
        support_x,
        support_y,
        steps=steps,
        lr=lr,
        first_order=first_order,
        loss_fn=loss_fn,
    )
    return loss_fn(functional_call(model, adapted, (query_x,)), query_y)


def meta_loss(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    loss_fn: LossFn = F.mse_loss,
) -> torch.Tensor:
    """The MAML objective: mean over tasks of the query loss after ``steps`` inner steps.

    All tasks run at once under ``torch.func.vmap`` (``params`` is shared, the task tensors are
    mapped over their first dimension).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from kiln.meta.tasks import SineTasks
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> b = SineTasks().sample(4, shots=5, query=5, generator=torch.Generator())
        >>> meta_loss(net, params_of(net), b, steps=2, lr=0.01).shape
        torch.Size([])
    """

    def one_task(
        p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
    ) -> torch.Tensor:
        return task_query_loss(
            model, p, sx, sy, qx, qy, steps=steps, lr=lr, first_order=first_order, loss_fn=loss_fn
        )

    per_task = vmap(one_task, in_dims=(None, 0, 0, 0, 0))(params, *tasks)
    return per_task.mean()


def meta_gradient(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    loss_fn: LossFn = F.mse_loss,
) -> tuple[Params, torch.Tensor]:
    """The meta-gradient and the meta-loss, ``torch.func.grad_and_value`` of :func:`meta_loss`.

    Second-order by default (the exact gradient of the query loss after adaptation);
    ``first_order=True`` gives the FOMAML approximation.

    Args:
        model: the network (structure only).
        params: the initialisation being meta-learned, by name (see :func:`params_of`).
        tasks: a meta-batch of tasks.
        steps: inner steps per task.
        lr: inner learning rate.
        first_order: FOMAML instead of MAML.
        loss_fn: inner and outer loss, ``loss_fn(prediction, target) -> scalar``.

    Returns:
        ``(grads, loss)``: gradients by parameter name and the detached scalar meta-loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from kiln.meta.tasks import SineTasks
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        >>> b = SineTasks().sample(25, shots=10, query=10, generator=torch.Generator())
        >>> grads, loss = meta_gradient(net, params_of(net), b, steps=1, lr=0.01)
        >>> for name, p in net.named_parameters():
        ...     p.grad = grads[name]
        >>> opt.step()
    """

    def objective(p: Params) -> torch.Tensor:
        return meta_loss(
            model, p, tasks, steps=steps, lr=lr, first_order=first_order, loss_fn=loss_fn
        )

    grads, loss = grad_and_value(objective)(params)
    return grads, loss.detach()


def adaptation_losses(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    *,
    steps: Sequence[int],
    lr: float,
    loss_fn: LossFn = F.mse_loss,
) -> torch.Tensor:
    """Per-task query loss after each number of inner steps in ``steps``, for evaluation.

    One adaptation path per task (up to ``max(steps)``), scored at every requested count; no
    meta-gradient is kept.

    Args:
        model: the network (structure only).
        params: the starting parameters (a meta-learned initialisation or any other).
        tasks: the evaluation tasks.
        steps: inner-step counts to score, e.g. ``[0, 1, 10]``; each at least 0.
        lr: inner learning rate.
        loss_fn: ``loss_fn(prediction, target) -> scalar``.

    Returns:
        ``(len(steps), num_tasks)`` losses.

    Raises:
        ValueError: an empty or negative step count.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from kiln.meta.tasks import SineTasks
        >>> net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> b = SineTasks().sample(6, shots=10, query=20, generator=torch.Generator())
        >>> adaptation_losses(net, params_of(net), b, steps=[0, 1, 10], lr=0.01).shape
        torch.Size([3, 6])
    """
    wanted = [int(s) for s in steps]
    if not wanted or min(wanted) < 0:
        raise ValueError(
            f"inner-step counts must be a non-empty list of integers >= 0, got {steps}"
        )
    order = sorted(set(wanted))

    def one_task(
        p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
    ) -> torch.Tensor:
        scored: dict[int, torch.Tensor] = {}
        done = 0
        for target in order:
            p = adapt(model, p, sx, sy, steps=target - done, lr=lr, loss_fn=loss_fn)
            done = target
            scored[target] = loss_fn(functional_call(model, p, (qx,)), qy)
        return torch.stack([scored[s] for s in wanted])

    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():  # torch.func.grad still differentiates inside; nothing outside records
        per_task = vmap(one_task, in_dims=(None, 0, 0, 0, 0))(params, *tasks)
    return per_task.transpose(0, 1)

"""Multi-task loss with learned uncertainty weights (Kendall et al. 2018) or fixed weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kiln.losses._common import _desc


class MultiTaskLoss(nn.Module):
    """Combines several task losses, with learned uncertainty weights or fixed weights.

    Learned (Kendall, Gal and Cipolla 2018): one parameter ``s_i = log sigma_i^2`` per task,
    ``L = sum_i exp(-s_i) L_i + s_i``. A noisy task (large ``L_i``) learns a large ``s_i`` and
    a small weight; the ``+ s_i`` term stops every weight from going to zero. At the optimum
    ``s_i = log L_i``. Convention: one factor for every task. The paper's regression term
    ``L_i / (2 sigma^2) + log sigma`` is half of ours (same optimum); its classification term
    ``L_i / sigma^2 + log sigma`` has half our ``s_i`` term. Fixed: ``L = sum_i w_i L_i``.

    Add the module's parameters to the optimizer, without weight decay (decay would pull every
    ``s_i`` to 0, i.e. equal weights).

    Args:
        tasks: The number of tasks, or their names (then :meth:`forward` also takes a dict).
        weights: Fixed weights, one per task; ``None`` learns them.
        init_log_var: Initial ``s_i`` (0 = weight 1).

    Example:
        >>> mtl = MultiTaskLoss(["digit", "parity"])
        >>> opt = torch.optim.AdamW(
        ...     [{"params": mtl.parameters(), "weight_decay": 0.0}], lr=0.1)
        >>> loss = mtl({"digit": torch.tensor(2.0), "parity": torch.tensor(0.5)})
        >>> loss.item()  # s = 0: the plain sum
        2.5
        >>> loss.backward(); opt.step()
        >>> mtl.task_weights()  # the noisier task's weight went down
        tensor([0.9048, 1.1052])
    """

    log_vars: nn.Parameter | None
    fixed_weights: torch.Tensor | None

    def __init__(
        self,
        tasks: int | Sequence[str],
        *,
        weights: Sequence[float] | None = None,
        init_log_var: float = 0.0,
    ) -> None:
        super().__init__()
        self.names = [f"task{i}" for i in range(tasks)] if isinstance(tasks, int) else list(tasks)
        n = len(self.names)
        if n < 1 or len(set(self.names)) != n:
            raise ValueError(f"multi-task loss: needs >= 1 task with distinct names, got {tasks!r}")
        if weights is None:
            self.log_vars = nn.Parameter(torch.full((n,), float(init_log_var)))
            self.register_buffer("fixed_weights", None)
        else:
            if len(weights) != n:
                raise ValueError(
                    f"multi-task loss: {len(weights)} weights for {n} tasks {self.names}; give "
                    f"one weight per task, or weights=None to learn them"
                )
            self.log_vars = None
            self.register_buffer("fixed_weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The combined loss.

        Args:
            losses: Scalar task losses in task order, or a dict keyed by the task names.

        Returns:
            The scalar total.

        Raises:
            ValueError: On a wrong number of losses, unknown names, or a non-scalar loss.
        """
        if isinstance(losses, Mapping):
            if set(losses) != set(self.names):
                raise ValueError(
                    f"multi-task loss: got losses for {sorted(losses)}, expected {self.names}"
                )
            values = [losses[name] for name in self.names]
        else:
            values = list(losses)
            if len(values) != len(self.names):
                raise ValueError(
                    f"multi-task loss: got {len(values)} losses for {len(self.names)} tasks "
                    f"{self.names}"
                )
        for name, value in zip(self.names, values, strict=True):
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                got = _desc(value) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"multi-task loss: task {name!r} loss must be a scalar tensor, got {got}; "
                    f"reduce it first (reduction='mean')"
                )
        dtype = torch.float32
        for v in values:
            dtype = torch.promote_types(dtype, v.dtype)
        stacked = torch.stack([v.to(dtype) for v in values])
        if self.log_vars is None:
            assert self.fixed_weights is not None
            return (self.fixed_weights.to(stacked.device) * stacked).sum()
        s = self.log_vars.to(stacked.device, dtype)
        return (torch.exp(-s) * stacked + s).sum()

    def task_weights(self) -> torch.Tensor:
        """The current weight of each task (``exp(-s_i)`` or the fixed ones), detached.

        Example:
            >>> MultiTaskLoss(2, weights=[1.0, 0.1]).task_weights()
            tensor([1.0000, 0.1000])
        """
        if self.log_vars is None:
            assert self.fixed_weights is not None
            return self.fixed_weights.clone()
        return torch.exp(-self.log_vars.detach())


class MultiTaskCriterion(nn.Module):
    """The trainer's loss for multi-target data: a loss per task, combined by MultiTaskLoss.

    Outputs are a dict ``{task: tensor}`` (see :class:`kiln.models.multihead.MultiHead`);
    targets are the float ``[N, T]`` tensor of a multi-task source, one column per task in
    ``tasks`` order. A classification task uses cross-entropy (``label_smoothing`` applies) on
    the column read as class indices, a regression task mean squared error. The combination is
    :class:`MultiTaskLoss`: learned uncertainty weights (its ``log_vars`` are this module's
    parameters: the trainer puts them in the optimizer without weight decay and saves them in
    every checkpoint) or fixed ``weights``.

    ``reduction="sum"`` returns ``N x`` the combined batch-mean loss, so an evaluation pass
    (summed over batches, divided by the examples) gives the combined loss of the whole split.

    Args:
        tasks: ``DataInfo.tasks`` entries (name, task, num_classes).
        weights: task name -> fixed weight; ``None`` learns them.
        label_smoothing: for the classification tasks.
        init_log_var: initial ``s_i`` of the learned weights.

    Example:
        >>> crit = MultiTaskCriterion([{"name": "a", "task": "classification", "num_classes": 2},
        ...                            {"name": "b", "task": "regression"}])
        >>> out = {"a": torch.zeros(2, 2), "b": torch.zeros(2, 1)}
        >>> round(crit(out, torch.tensor([[0.0, 1.0], [1.0, 1.0]])).item(), 4)  # ln 2 + 1
        1.6931
    """

    def __init__(
        self,
        tasks: Sequence[Mapping[str, object]],
        *,
        weights: Mapping[str, float] | None = None,
        label_smoothing: float = 0.0,
        init_log_var: float = 0.0,
    ) -> None:
        super().__init__()
        self.tasks = [dict(t) for t in tasks]
        self.names = [str(t["name"]) for t in self.tasks]
        fixed = None
        if weights is not None:
            unknown = sorted(set(weights) - set(self.names))
            missing = [n for n in self.names if n not in weights]
            if unknown or missing:
                raise ValueError(
                    f"loss.task_weights must give one weight per task {self.names}; "
                    f"unknown {unknown}, missing {missing}"
                )
            fixed = [float(weights[n]) for n in self.names]
        self.combine = MultiTaskLoss(self.names, weights=fixed, init_log_var=init_log_var)
        self.label_smoothing = label_smoothing

    def task_losses(
        self, out: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The batch-mean loss of each task, by name.

        Raises:
            ValueError: outputs that are not a dict with one tensor per task, or targets that
                are not ``[N, tasks]``.
        """
        if not isinstance(out, Mapping):
            got = _desc(out) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"multi-task loss: the model must return a dict {{task: output}} for tasks "
                f"{self.names}, got {got}; use model.name=multihead or return a dict"
            )
        missing = [n for n in self.names if n not in out]
        if missing:
            raise ValueError(
                f"multi-task loss: the model's outputs {sorted(out)} lack tasks {missing}"
            )
        if target.dim() != 2 or target.size(1) != len(self.names):
            raise ValueError(
                f"multi-task loss: targets must be [N, {len(self.names)}] (one column per task "
                f"{self.names}), got {_desc(target)}"
            )
        losses: dict[str, torch.Tensor] = {}
        for j, t in enumerate(self.tasks):
            name, pred = self.names[j], out[self.names[j]]
            column = target[:, j]
            if t["task"] == "classification":
                losses[name] = F.cross_entropy(
                    pred, column.long(), label_smoothing=self.label_smoothing
                )
            else:
                losses[name] = F.mse_loss(pred.reshape(column.shape).float(), column.float())
        return losses

    def forward(
        self, out: Mapping[str, torch.Tensor], target: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"multi-task loss: reduction must be mean or sum, got {reduction!r}")
        total = self.combine(self.task_losses(out, target))
        return total * target.size(0) if reduction == "sum" else total

    def task_weights(self) -> dict[str, float]:
        """Each task's current weight (``exp(-s_i)``, or the fixed weight)."""
        return dict(zip(self.names, self.combine.task_weights().tolist(), strict=True))

"""Task metrics kept on the device (torchmetrics), read with ``.item()`` only when reported.

Classification: accuracy, top-k accuracy, macro-F1. Regression: MSE, MAE. Language modelling:
perplexity = exp(mean token cross-entropy), computed from the summed loss (exact, no extra pass).

Example:
    >>> import torch
    >>> m = TaskMetrics("classification", num_classes=3, device=torch.device("cpu"))
    >>> m.update(torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]), torch.tensor([0, 2]),
    ...          loss_sum=torch.tensor(1.0), count=2)
    >>> m.compute()["acc"]
    0.5
"""

from __future__ import annotations

import math
from typing import Any

import torch

# torchmetrics (and the scipy it imports) costs ~1 s to import: it is imported on first use, so
# a run that fails on bad data or a bad model says so without paying for it.


class TaskMetrics:
    """Loss + task metrics accumulated over an evaluation pass.

    Args:
        task: ``classification``, ``regression`` or ``lm``.
        num_classes: classes (classification).
        device: where the metric state lives (the model's device: no host sync per batch).
        top_k: k of the top-k accuracy (reported when num_classes > k).
        sync: sum the states over all ranks in ``compute`` (each rank saw its own shard).
    """

    def __init__(
        self,
        task: str,
        *,
        num_classes: int | None = None,
        device: torch.device,
        top_k: int = 5,
        sync: bool = False,
    ) -> None:
        import torchmetrics
        from torchmetrics import classification as tmc
        from torchmetrics import regression as tmr

        self.task = task
        metrics: dict[str, Any] = {}
        opts: dict[str, Any] = {"sync_on_compute": sync}
        if task == "classification":
            if not num_classes:
                raise ValueError("classification metrics need num_classes")
            metrics["acc"] = tmc.MulticlassAccuracy(num_classes, average="micro", **opts)
            metrics["f1_macro"] = tmc.MulticlassF1Score(num_classes, average="macro", **opts)
            if num_classes > top_k:
                metrics[f"top{top_k}_acc"] = tmc.MulticlassAccuracy(
                    num_classes, top_k=top_k, average="micro", **opts
                )
        elif task == "regression":
            metrics["mse"] = tmr.MeanSquaredError(**opts)
            metrics["mae"] = tmr.MeanAbsoluteError(**opts)
        elif task != "lm":
            raise ValueError(f"unknown task {task!r}; allowed: classification, regression, lm")
        self.sync = sync
        # compute_groups=False: with groups, torchmetrics merges metrics whose states agree after
        # the first batch (top-1 and top-5 accuracy often do) and then reports one for both.
        self.metrics = (
            torchmetrics.MetricCollection(metrics, compute_groups=False).to(device)
            if metrics
            else None
        )
        self.device = device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0

    def update(
        self, output: torch.Tensor, target: torch.Tensor, *, loss_sum: torch.Tensor, count: int
    ) -> None:
        """Add a batch: model output, targets, the batch's summed loss and its element count."""
        self.loss_sum += loss_sum.detach().to(torch.float64)
        self.count += count
        if self.metrics is not None:
            out = output.detach().float()
            if self.task == "regression" and out.shape != target.shape:
                out = out.reshape(target.shape)
            self.metrics.update(out, target)

    def compute(self) -> dict[str, float]:
        """All metrics as floats (one host sync)."""
        total = self.loss_sum
        count = self.count
        if self.sync:
            from kiln.train.distributed import all_reduce_sum

            both = all_reduce_sum(torch.stack([total, total.new_tensor(float(count))]))
            total, count = both[0], int(both[1].item())
        loss = (total / max(count, 1)).item()
        out = {"loss": loss}
        if self.task == "lm":
            out["perplexity"] = math.exp(min(loss, 700.0))
        if self.metrics is not None:
            out.update({k: float(v) for k, v in self.metrics.compute().items()})
        return out

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.count = 0
        if self.metrics is not None:
            self.metrics.reset()


class MultiTaskMetrics:
    """Per-task metrics for multi-target data (outputs a dict by task, targets ``[N, T]``).

    Reported names are ``<task>/<metric>`` (``digit/acc``, ``parity/loss``), and ``loss`` is the
    plain sum of the task losses (cross-entropy or MSE, unweighted). The training objective's
    learned weights change its scale from epoch to epoch, so the plain sum is the number that
    stays comparable across epochs, runs and ``kiln eval``.
    """

    def __init__(
        self, tasks: list[dict[str, Any]], *, device: torch.device, top_k: int = 5, sync: bool
    ) -> None:
        self.tasks = tasks
        self.parts = {
            t["name"]: TaskMetrics(
                t["task"], num_classes=t.get("num_classes"), device=device, top_k=top_k, sync=sync
            )
            for t in tasks
        }

    def update(
        self,
        output: dict[str, torch.Tensor],
        target: torch.Tensor,
        *,
        loss_sum: torch.Tensor,
        count: int,
    ) -> None:
        """Add a batch; ``loss_sum`` (the weighted objective) is not used, see the class doc."""
        import torch.nn.functional as F

        for j, t in enumerate(self.tasks):
            name = t["name"]
            pred, column = output[name].detach(), target[:, j]
            if t["task"] == "classification":
                y = column.long()
                task_sum = F.cross_entropy(pred.float(), y, reduction="sum")
            else:
                y = column.float()
                task_sum = F.mse_loss(pred.float().reshape(y.shape), y, reduction="sum")
            self.parts[name].update(pred, y, loss_sum=task_sum, count=count)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {"loss": 0.0}
        for name, part in self.parts.items():
            values = part.compute()
            out["loss"] += values["loss"]
            out.update({f"{name}/{k}": v for k, v in values.items()})
        return out

    def reset(self) -> None:
        for part in self.parts.values():
            part.reset()


def build_metrics(
    info: Any, *, device: torch.device, top_k: int = 5, sync: bool = False
) -> TaskMetrics | MultiTaskMetrics:
    """The metrics object for a :class:`~kiln.data.base.DataInfo` (single- or multi-task).

    Example:
        >>> from kiln.data.base import DataInfo
        >>> m = build_metrics(DataInfo("regression", (3,)), device=torch.device("cpu"))
        >>> m.update(torch.zeros(2, 1), torch.ones(2, 1), loss_sum=torch.tensor(2.0), count=2)
        >>> m.compute()["mse"]
        1.0
    """
    if info.task == "multitask":
        from kiln.data.multitask import task_columns

        return MultiTaskMetrics(task_columns(info), device=device, top_k=top_k, sync=sync)
    return TaskMetrics(
        info.task, num_classes=info.num_classes, device=device, top_k=top_k, sync=sync
    )


def confusion_matrix(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``[true, predicted]`` (rows are true classes)."""
    from torchmetrics import classification as tmc

    cm = tmc.MulticlassConfusionMatrix(num_classes)
    return cm(preds, target).to(torch.long)

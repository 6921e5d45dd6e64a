"""Stochastic Weight Averaging (Izmailov et al., 2018) on top of ``torch.optim.swa_utils``.

From ``start_epoch`` on, the learning rate anneals to a constant ``swa_lr`` (``SWALR``) and the
weights at the end of every epoch are averaged into an ``AveragedModel``. At the end, BatchNorm
statistics are recomputed for the averaged weights (they are not the average of the running
statistics) with one pass over the training data; the averaged model is the result.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> swa = SWA(net, start_epoch=1, swa_lr=0.05)
    >>> for epoch in range(3):
    ...     swa.begin_epoch(opt, epoch)     # SWALR takes over the LR from start_epoch
    ...     # ... train one epoch ...
    ...     swa.end_epoch(net, epoch)       # average the weights, step SWALR
    >>> swa.averaged.n_averaged.item()
    2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

__all__ = ["SWA", "recompute_bn"]


class SWA:
    """Weight averaging plus its LR schedule; the state goes into checkpoints.

    Args:
        model: the (unwrapped) model to average.
        start_epoch: first averaged epoch (0-based).
        swa_lr: the constant LR SWALR anneals to.
        anneal_epochs: epochs of annealing from the current LR to ``swa_lr``.
        anneal_strategy: ``cos`` or ``linear``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        start_epoch: int,
        swa_lr: float,
        anneal_epochs: int = 1,
        anneal_strategy: str = "cos",
    ) -> None:
        if start_epoch < 0:
            raise ValueError(f"swa start_epoch must be >= 0, got {start_epoch}")
        if not swa_lr > 0:
            raise ValueError(f"swa_lr must be > 0, got {swa_lr}")
        # Parameters only: BatchNorm statistics are recomputed for the average at the end.
        self.averaged = AveragedModel(model, use_buffers=False)
        self.start_epoch = start_epoch
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = (
            swa_lr,
            anneal_epochs,
            anneal_strategy,
        )
        self.scheduler: SWALR | None = None

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` is averaged (and SWALR owns the learning rate)."""
        return epoch >= self.start_epoch

    def begin_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Create the SWA LR schedule at the first averaged epoch."""
        if self.active(epoch) and self.scheduler is None:
            self.scheduler = self._make_scheduler(optimizer)

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> SWALR:
        return SWALR(
            optimizer,
            swa_lr=self.swa_lr,
            anneal_epochs=self.anneal_epochs,
            anneal_strategy=self.anneal_strategy,  # type: ignore[arg-type]
        )

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        """Average ``model`` into the SWA weights and step SWALR (averaged epochs only)."""
        if not self.active(epoch):
            return
        self.averaged.update_parameters(model)
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def result(
        self,
        loader: Iterable[Any] | None = None,
        to_device: Callable[[Any], Any] | None = None,
    ) -> nn.Module:
        """The averaged model, with BatchNorm statistics recomputed over ``loader``."""
        model = self.averaged.module
        if loader is not None:
            recompute_bn(model, loader, to_device)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {
            "averaged": self.averaged.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Restore :meth:`state_dict`; once SWALR has started, its LR goes back into ``optimizer``.

        Building SWALR steps it once (an LR computed from whatever the optimizer holds now, e.g.
        the main schedule's LR that its own ``load_state_dict`` just wrote), so the saved LR
        must be written back for the next update to use the LR of the interrupted run.
        """
        self.averaged.load_state_dict(state["averaged"])
        if state["scheduler"] is not None:
            self.scheduler = self._make_scheduler(optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            _write_lrs(optimizer, self.scheduler.get_last_lr())


def _write_lrs(optimizer: torch.optim.Optimizer, lrs: list[float | torch.Tensor]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a tensor LR (capturable/fused optimizers) keeps its identity
        else:
            group["lr"] = float(lr)  # a tensor here would alias the scheduler's own value


@torch.no_grad()
def recompute_bn(
    model: nn.Module, loader: Iterable[Any], to_device: Callable[[Any], Any] | None = None
) -> bool:
    """Recompute BatchNorm running statistics as exact averages over ``loader``.

    Like ``torch.optim.swa_utils.update_bn`` but takes ``(x, y)`` batches through ``to_device``.
    Returns False (and does nothing) when the model has no BatchNorm layer.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None  # a cumulative average over all batches
    was_training = model.training
    model.train()
    for batch in loader:
        if to_device is not None:
            batch = to_device(batch)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        model(x)
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    model.train(was_training)
    return True

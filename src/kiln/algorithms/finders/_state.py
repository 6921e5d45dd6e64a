"""What the finders save and put back: weights, grads, optimizer, Engine counters, RNG."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kiln.train.engine import Engine
from kiln.train.reproducibility import rng_state, set_rng_state

LossFn = Callable[[Any, Any], torch.Tensor]


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (device memory stays free for the test)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _Snapshot:
    """Everything a finder changes, copied to the CPU, and put back on :meth:`restore`."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, engine: Engine | None
    ) -> None:
        self.model, self.optimizer, self.engine = model, optimizer, engine
        self.weights = _cpu_copy(model.state_dict())
        self.grads = [None if p.grad is None else _cpu_copy(p.grad) for p in model.parameters()]
        self.modes = [m.training for m in model.modules()]
        self.optim = _cpu_copy(optimizer.state_dict())
        self.engine_state = _cpu_copy(engine.state_dict()) if engine is not None else None
        self.rng = rng_state()

    def restore(self) -> None:
        # load_state_dict copies into the existing parameters, so the optimizer's references stay
        # valid; the optimizer keeps the tensors it is given, hence a fresh copy on every restore.
        self.model.load_state_dict(self.weights)
        for p, g in zip(self.model.parameters(), self.grads, strict=True):
            p.grad = None if g is None else g.to(p.device, copy=True)
        for m, mode in zip(self.model.modules(), self.modes, strict=True):
            m.training = mode
        self.optimizer.load_state_dict(_cpu_copy(self.optim))
        if self.engine is not None and self.engine_state is not None:
            self.engine.load_state_dict(_cpu_copy(self.engine_state))
        set_rng_state(self.rng)


@contextmanager
def preserved(
    model: nn.Module, optimizer: torch.optim.Optimizer, engine: Engine | None = None
) -> Iterator[Callable[[], None]]:
    """Run a block, then restore model, gradients, optimizer, Engine counters and RNGs exactly.

    The copies live on the CPU, so on a GPU they take no device memory while the block runs.
    The context gives a function that restores early (e.g. between trials); the final restore
    happens even when the block raises.

    Args:
        model: The model whose parameters, buffers, gradients and train/eval modes to keep.
        optimizer: The optimizer whose state and hyper-parameters (``lr``...) to keep.
        engine: An Engine whose update counters and GradScaler state to keep.

    Yields:
        A function that restores the captured state now.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> before = model.weight.clone()
        >>> with preserved(model, opt):
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     opt.step()
        >>> torch.equal(model.weight, before)
        True
    """
    snap = _Snapshot(model, optimizer, engine)
    try:
        yield snap.restore
    finally:
        snap.restore()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: LossFn,
    engine: Engine | None,
) -> torch.Tensor:
    """One update on one ``(inputs, targets)`` batch; returns the detached loss."""
    if engine is None:
        x, y = batch
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    x, y = engine.to_device(batch)
    with engine.micro_step(0, 1):  # a group of one: every finder step is an update
        with engine.autocast():
            loss = loss_fn(model(x), y)
        engine.backward(loss)
    engine.optimizer_step(optimizer)
    return loss.detach()


# --------------------------------------------------------------------------- LR range test

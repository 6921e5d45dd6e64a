"""The train step: one optimizer update, in order, on one screen.

:func:`train_step` is what ``Trainer.fit`` runs for every update, and what ``kiln profile
--bottleneck`` times phase by phase (its ``lap`` argument reads a clock between the phases; in
training it does nothing)::

    for each loader batch of the accumulation group:      (the Engine says where it ends)
        fetch -> to_device -> mix (mixup/cutmix)
        for each micro-batch of it:                       (one, unless auto-microbatch split it)
            with engine.micro_step(): forward + loss under autocast; engine.backward(loss)
    guard: are the group's gradients (and fp16 loss) finite?   (one host read; else return)
    engine.optimizer_step: unscale -> clip -> step -> scaler -> zero_grad
    per-update LR schedule; EMA

What happens around it (counters, callbacks, logging, checkpoints, the non-finite policy)
stays in the Trainer's loop, which reads the :class:`StepResult`.

Example:
    >>> from kiln.config import load_config
    >>> from kiln.train.build import build_parts
    >>> parts = build_parts(load_config(None, ["model.kwargs.hidden=[8]"]), None, None)
    >>> losses = []
    >>> r = train_step(parts, enumerate(parts.train_loader), losses, epoch=0, step=0)
    >>> r.finite, r.batch, len(losses)
    (True, 1, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.train import distributed
from kiln.train.build import Parts
from kiln.train.microbatch import AutoMicrobatch, is_out_of_memory

__all__ = [
    "StepResult",
    "epoch_schedule",
    "forward_backward",
    "mean_loss",
    "no_lap",
    "train_step",
]


def no_lap(phase: str) -> None:
    """The clock of a step that is not being timed."""


@dataclass(slots=True)
class StepResult:
    """What one :func:`train_step` did.

    Attributes:
        finite: False when the guard found NaN/Inf: nothing was applied and the gradients are
            still there (the non-finite policy decides).
        batch: loader batches of the epoch done after this step.
        micro: micro-batches per loader batch now (auto-microbatch may have doubled it).
        grad_norm: the total gradient norm (a device tensor) when asked for or clipping.
        x: the inputs of the group's last loader batch (a non-finite diagnosis re-runs them).
    """

    finite: bool
    batch: int
    micro: int
    grad_norm: torch.Tensor | None = None
    x: Any = None


def train_step(
    parts: Parts,
    batches: Iterator[tuple[int, Any]],
    losses: list[torch.Tensor],
    *,
    epoch: int,
    step: int,
    micro: int = 1,
    guard: bool = True,
    grad_norm: bool = False,
    schedule: Any = None,
    auto: AutoMicrobatch | None = None,
    lap: Callable[[str], None] = no_lap,
) -> StepResult | None:
    """One optimizer update from ``batches``; None when they run out before a group starts.

    Args:
        parts: the fit's parts (engine, model, loss, optimizer, techniques, sizes).
        batches: ``(i, batch)`` pairs, ``i`` counting the loader batches of the epoch.
        losses: each micro-batch's detached loss is appended (no host read here).
        epoch: the current epoch (mixing switches off in the last ones).
        step: updates so far (EMA updates every ``ema.every``).
        micro: micro-batches per loader batch.
        guard: check the group's gradients for NaN/Inf before the update (one host read).
        grad_norm: return the total gradient norm (for logging).
        schedule: an LR scheduler stepped after each update the optimizer took, or None.
        auto: halves the micro-batch and replays the group on out-of-memory (else it raises).
        lap: called with the phase that just ended (``kiln profile --bottleneck``'s clock).
    """
    engine, optimizer, tech = parts.engine, parts.optimizer, parts.tech
    start = len(losses)
    if auto is not None:
        auto.start_group(start)
    for i, batch in batches:  # fetch
        lap("data")
        x, y = engine.to_device(batch)
        lap("to_device")
        if tech.mixer is not None:  # mixup/cutmix: soft targets
            x, y = tech.mixer(x, y, epoch=epoch)
            lap("data")
        if auto is not None:
            auto.add(i, x, y)
        try:  # forward -> loss -> backward
            update = forward_backward(parts, i, x, y, micro, losses, lap)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if auto is None or not is_out_of_memory(exc):
                raise

            def run(i: int, x: Any, y: Any, micro: int) -> bool:
                return forward_backward(parts, i, x, y, micro, losses, lap)

            drop = lambda: engine.zero_grad(optimizer)  # noqa: E731
            micro, update = auto.shrink_and_replay(micro, run, drop=drop, losses=losses)
        if update:
            break
    else:
        return None
    if guard:  # one host read: a NaN loss already makes fp32/bf16 gradients NaN
        loss = torch.stack(losses[start:]).sum() if engine.precision.kind == "fp16" else None
        finite = engine.grads_finite(optimizer, loss)
        lap("syncs")
        if not finite:
            return StepResult(False, i + 1, micro, x=x)
    norm = engine.optimizer_step(optimizer, grad_norm=grad_norm)  # unscale, clip, step, zero
    if schedule is not None and engine.last_step_taken:  # not after an fp16 overflow skip
        schedule.step()
    if tech.ema is not None and (step + 1) % tech.ema_every == 0:
        tech.ema.update(engine.model)  # type: ignore[arg-type]
    lap("optimizer")
    return StepResult(True, i + 1, micro, norm, x)


def forward_backward(
    parts: Parts,
    i: int,
    x: Any,
    y: Any,
    micro: int,
    losses: list[torch.Tensor],
    lap: Callable[[str], None] = no_lap,
) -> bool:
    """Forward and backward of loader batch ``i``; True when it ends an accumulation group.

    The batch runs as ``micro`` micro-batches (one unless auto-microbatch split it), each
    weighted by the Engine by its share of the group's samples, so the gradient is the same.
    """
    engine, model, loss_fn, n = parts.engine, parts.model, parts.loss_fn, parts.n_batches
    if micro == 1:
        pieces: Sequence[tuple[Any, Any]] = ((x, y),)
    else:
        size = math.ceil(parts.per_rank_batch / micro)
        pieces = list(zip(x.split(size), y.split(size), strict=True))
    last = len(pieces) - 1
    for j, (xb, yb) in enumerate(pieces):
        # The Engine decides whether this updates (only a batch's last piece may).
        with engine.micro_step(i, n, size=len(xb), last_piece=j == last) as update:
            with engine.autocast():
                loss = loss_fn(model(xb), yb)
            lap("forward")
            engine.backward(loss)
        lap("backward")
        losses.append(loss.detach())
    return update


def epoch_schedule(schedule: Any, val: dict[str, float], monitor: str) -> None:
    """Step an epoch or plateau LR schedule at the end of an epoch (per-update ones: no-op).

    A plateau schedule steps on the monitored validation metric, and only when one was
    measured this epoch.
    """
    if schedule is None:
        return
    if schedule.interval == "epoch":
        schedule.step()
    elif schedule.interval == "plateau" and val:
        schedule.step(val[monitor.split("/", 1)[1]])


def mean_loss(losses: list[torch.Tensor], world: int = 1) -> float:
    """The mean of the logged losses over every rank (one host read; an all-reduce if several).

    Example:
        >>> mean_loss([torch.tensor(1.0), torch.tensor(2.0)])
        1.5
    """
    mean = torch.stack(losses).float().mean()
    if world > 1:  # every rank logs at the same step: average the ranks' losses
        mean = distributed.all_reduce_sum(mean.clone()) / world
    return mean.item()

"""Learning-rate schedules built from a :class:`~kiln.config.SchedulerConfig`.

Every schedule is a stock ``torch.optim.lr_scheduler`` object wrapped in a small
:class:`Schedule` that says *when* to step it (``interval``: after every optimizer update,
after every epoch, or after every validation with the monitored metric), so the training
loop never has to know which schedule it holds. The update-based curves (``cosine``,
``warmup_cosine``, ``linear``) are closed-form ``LambdaLR`` factors of each group's own start
LR, so per-group LR multipliers survive the whole schedule and a resumed run reproduces the
same LRs whether or not the optimizer state was restored first.

``min_lr`` is the floor of a group whose multiplier is 1; a group built by
:func:`kiln.train.optim.param_groups` with ``lr_mult`` m ends at ``m * min_lr``, so the ratio
between groups holds to the end. (A group without an ``lr_mult`` entry counts as m = 1.)

Example:
    >>> import torch
    >>> from kiln.config import SchedulerConfig
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    >>> cfg = SchedulerConfig(name="warmup_cosine", warmup_steps=2)
    >>> sched = build_scheduler(opt, cfg, steps_per_epoch=5, epochs=2)
    >>> sched.interval, [round(lr, 4) for lr in sched.last_lr()]
    ('step', [0.0333])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ExponentialLR,
    LambdaLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)

from kiln.config import SchedulerConfig

__all__ = ["Interval", "Schedule", "build_scheduler", "scale_lrs"]

Interval = Literal["step", "epoch", "plateau"]

_INTERVAL: dict[str, Interval] = {
    "step": "epoch",
    "multistep": "epoch",
    "exponential": "epoch",
    "cosine": "step",
    "warmup_cosine": "step",
    "linear": "step",
    "onecycle": "step",
    "plateau": "plateau",
}

# The SchedulerConfig fields each schedule reads; any other field changed from its default has
# no effect, which is almost always a mistake (e.g. warmup_steps with name=cosine), so we refuse.
_USES: dict[str, set[str]] = {
    "step": {"step_size", "gamma"},
    "multistep": {"milestones", "gamma"},
    "exponential": {"gamma"},
    "cosine": {"min_lr"},
    "warmup_cosine": {"warmup_steps", "warmup_fraction", "min_lr"},
    "linear": {"warmup_steps", "warmup_fraction", "min_lr"},
    "onecycle": {"max_lr", "pct_start", "min_lr"},
    "plateau": {"patience", "factor", "min_lr"},
}


class Schedule:
    """A torch LR scheduler plus when to step it.

    Args:
        name: The ``SchedulerConfig.name`` it was built from (checked on ``load_state_dict``).
        scheduler: The wrapped ``torch.optim.lr_scheduler`` object (public, for inspection).
        interval: ``"step"``: call :meth:`step` after every optimizer update; ``"epoch"``: after
            every epoch; ``"plateau"``: after every validation, with the monitored metric.

    Example:
        >>> sched = build_scheduler(opt, SchedulerConfig(name="plateau"), steps_per_epoch=1,
        ...                         epochs=10)  # doctest: +SKIP
        >>> sched.step(val_loss)  # doctest: +SKIP
    """

    def __init__(self, name: str, scheduler: LRScheduler, interval: Interval) -> None:
        self.name = name
        self.scheduler = scheduler
        self.interval: Interval = interval

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer whose LRs this schedule sets."""
        return self.scheduler.optimizer

    def step(self, metric: float | torch.Tensor | None = None) -> None:
        """Advance the schedule by one interval (after ``optimizer.step()``, never before).

        Args:
            metric: The monitored validation value; required for ``plateau``, refused otherwise.

        Raises:
            ValueError: ``plateau`` stepped without a metric, or another schedule given one.
        """
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if metric is None:
                raise ValueError(
                    "the plateau schedule needs the monitored metric: call "
                    "schedule.step(val_loss) after each validation"
                )
            # float() on a tensor syncs with the device; this runs once per validation only.
            self.scheduler.step(float(metric))
        else:
            if metric is not None:
                raise ValueError(
                    f"the {self.name!r} schedule does not use a metric; call schedule.step() "
                    "(only scheduler.name=plateau is stepped with a metric)"
                )
            self.scheduler.step()

    def last_lr(self) -> list[float]:
        """The LR of each param group that the next optimizer update will use.

        Example:
            >>> sched.last_lr()  # doctest: +SKIP
            [0.001, 0.0001]
        """
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """A detached copy of the schedule's state (plain numbers; ``weights_only``-loadable).

        Example:
            >>> ckpt["scheduler"] = sched.state_dict()  # doctest: +SKIP
        """
        return {"name": self.name, "scheduler": copy.deepcopy(self.scheduler.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and put its LRs back into the optimizer.

        Writing the LRs back makes the next update use the saved LR even if the optimizer's
        own state (which also holds momentum buffers; load it too) is restored later or not at all.

        Example:
            >>> sched.load_state_dict(ckpt["scheduler"])  # doctest: +SKIP

        Raises:
            ValueError: the state belongs to a different schedule.
        """
        saved = state.get("name")
        if saved != self.name:
            raise ValueError(
                f"checkpoint holds a {saved!r} schedule but this one is {self.name!r}; "
                f"set scheduler.name={saved} to resume it, or start a fresh run"
            )
        self.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        groups = self.optimizer.param_groups
        for group, lr in zip(groups, self.scheduler.get_last_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = float(lr)

    def __repr__(self) -> str:
        return f"Schedule(name={self.name!r}, interval={self.interval!r}, lr={self.last_lr()})"


def build_scheduler(
    optimizer: Optimizer,
    cfg: SchedulerConfig,
    *,
    steps_per_epoch: int,
    epochs: int,
    total_steps: int | None = None,
) -> Schedule | None:
    """Build the schedule named by ``cfg`` (``None`` for ``"none"``).

    Build it right after the optimizer, before any ``optimizer.step()``.

    Args:
        optimizer: Its groups' current ``lr`` are the start (or peak) LRs.
        cfg: The schedule and its settings; fields the schedule would ignore must stay default.
        steps_per_epoch: Optimizer *updates* per epoch (batches divided by accumulation).
        epochs: Epochs of the run (``step``/``multistep`` must decay within them).
        total_steps: Updates of the whole run when not ``steps_per_epoch * epochs``
            (e.g. ``train.max_steps``).

    Returns:
        The :class:`Schedule`, or ``None`` when ``cfg.name == "none"``.

    Raises:
        ValueError: A setting that cannot work; the message says which field to change.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        >>> sched = build_scheduler(opt, SchedulerConfig(name="step", step_size=2),
        ...                         steps_per_epoch=10, epochs=5)
        >>> sched.interval
        'epoch'
    """
    name = cfg.name
    if name == "none":
        return None
    _refuse_unused(cfg)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 to build a schedule (got {epochs})")
    scheduler: LRScheduler
    if name == "step":
        if cfg.step_size >= epochs:
            raise ValueError(
                f"scheduler.step_size={cfg.step_size} never decays the LR in {epochs} epochs; "
                f"set it below train.epochs"
            )
        scheduler = StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif name == "multistep":
        _check_milestones(cfg.milestones, epochs)
        scheduler = MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
    elif name == "exponential":
        scheduler = ExponentialLR(optimizer, gamma=cfg.gamma)
    elif name == "plateau":
        mins = [cfg.min_lr * _mult(g) for g in optimizer.param_groups]
        scheduler = ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.factor, patience=cfg.patience, min_lr=mins
        )
    else:
        total = _total_updates(steps_per_epoch, epochs, total_steps)
        if name == "onecycle":
            scheduler = _onecycle(optimizer, cfg, total)
        else:
            warmup = _warmup(cfg, total)
            shape = "linear" if name == "linear" else "cosine"
            factors: list[Callable[[int], float]] = [
                partial(_factor, shape=shape, warmup=warmup, total=total, floor=floor)
                for floor in _floors(optimizer, cfg.min_lr)
            ]
            scheduler = LambdaLR(optimizer, lr_lambda=factors)
    return Schedule(name, scheduler, _INTERVAL[name])


# --------------------------------------------------------------------------- helpers


def _factor(step: int, *, shape: str, warmup: int, total: int, floor: float) -> float:
    """LR factor after ``step`` updates: linear warmup to 1, then cosine/linear to ``floor``."""
    if step < warmup:
        # (s+1)/(W+1), as nanoGPT: the first update already moves; update W runs at the peak.
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / (total - warmup))
    if shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _mult(group: dict[str, Any]) -> float:
    return float(group.get("lr_mult", 1.0))


def _floors(optimizer: Optimizer, min_lr: float) -> list[float]:
    """Per group: min_lr * mult as a fraction of the group's start LR."""
    floors = []
    for i, group in enumerate(optimizer.param_groups):
        start = float(group.get("initial_lr", group["lr"]))
        floor = 0.0 if start == 0.0 else min_lr * _mult(group) / start
        if floor > 1.0:
            raise ValueError(
                f"scheduler.min_lr={min_lr} is above the LR it should decay from "
                f"({start / _mult(group):g}, param group {i}); lower scheduler.min_lr "
                "below optim.lr"
            )
        floors.append(floor)
    return floors


def _total_updates(steps_per_epoch: int, epochs: int, total_steps: int | None) -> int:
    if total_steps is not None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (got {total_steps}); raise train.max_steps")
        return total_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"the schedule would last 0 updates (steps_per_epoch={steps_per_epoch} x "
            f"epochs={epochs}); the train loader yields no full update: lower "
            "train.accumulate or data.batch_size, or set data.drop_last=false"
        )
    return steps_per_epoch * epochs


def _warmup(cfg: SchedulerConfig, total: int) -> int:
    if cfg.warmup_steps and cfg.warmup_fraction:
        raise ValueError(
            f"set either scheduler.warmup_steps ({cfg.warmup_steps}) or "
            f"scheduler.warmup_fraction ({cfg.warmup_fraction}), not both"
        )
    warmup = cfg.warmup_steps or int(cfg.warmup_fraction * total)
    if warmup >= total:
        raise ValueError(
            f"warmup ({warmup} updates) must be shorter than the schedule ({total} updates); "
            "lower scheduler.warmup_steps / warmup_fraction or train for more updates"
        )
    return warmup


def _check_milestones(milestones: list[int], epochs: int) -> None:
    if not milestones:
        raise ValueError("scheduler.milestones is empty; give epochs, e.g. [30, 60]")
    if any(b <= a for a, b in pairwise(milestones)):
        raise ValueError(
            f"scheduler.milestones must be strictly increasing epochs (got {milestones})"
        )
    if milestones[0] < 1 or milestones[-1] >= epochs:
        raise ValueError(
            f"scheduler.milestones={milestones} must lie in 1..{epochs - 1} so each decay "
            f"happens within train.epochs={epochs}; change the milestones or train.epochs"
        )


def _onecycle(optimizer: Optimizer, cfg: SchedulerConfig, total: int) -> OneCycleLR:
    groups = optimizer.param_groups
    if cfg.pct_start * total <= 1:
        raise ValueError(
            f"onecycle needs more than 1 warmup update (pct_start={cfg.pct_start} x "
            f"{total} updates); raise scheduler.pct_start or train for more updates"
        )
    # max_lr is the peak of a multiplier-1 group; without it each group peaks at its own lr.
    peaks = [cfg.max_lr * _mult(g) if cfg.max_lr else float(g["lr"]) for g in groups]
    # Momentum cycling would switch on momentum for an optimizer configured without it.
    cycle = "betas" in optimizer.defaults or all(g.get("momentum", 0.0) > 0 for g in groups)
    scheduler = OneCycleLR(
        optimizer,
        max_lr=peaks,
        total_steps=total,
        pct_start=float(cfg.pct_start),
        cycle_momentum=cycle,
    )
    if cfg.min_lr > 0:
        # OneCycleLR reads each group's "min_lr" as the end of the cycle; default start/1e4.
        for i, group in enumerate(groups):
            end = cfg.min_lr * _mult(group)
            if end >= group["initial_lr"]:
                raise ValueError(
                    f"scheduler.min_lr={cfg.min_lr} must be below onecycle's start LR "
                    f"(peak/25 = {group['initial_lr']:g} in param group {i}); lower it"
                )
            group["min_lr"] = end
    return scheduler


def _refuse_unused(cfg: SchedulerConfig) -> None:
    defaults = SchedulerConfig.model_validate({})
    unused = [
        f"{field}={getattr(cfg, field)!r}"
        for field in type(cfg).model_fields
        if field != "name"
        and field not in _USES[cfg.name]
        and getattr(cfg, field) != getattr(defaults, field)
    ]
    if unused:
        users = sorted(_USES[cfg.name])
        raise ValueError(
            f"scheduler {', '.join(unused)} has no effect with scheduler.name={cfg.name} "
            f"(it reads only: {', '.join(users)}); remove the setting or pick a schedule "
            "that uses it"
        )


_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def scale_lrs(optimizer: Optimizer, schedule: Schedule | None, factor: float) -> None:
    """Multiply every learning rate, now and for the rest of the schedule, by ``factor``.

    Scales each group's LR entries (``lr`` and the ``initial_lr``/``max_lr``/``min_lr`` that
    schedules compute from) and the schedule's base LRs, so closed-form and chained schedules
    alike continue at the lower level. Used by the non-finite ``rollback`` policy.
    """
    if not factor > 0:
        raise ValueError(f"LR scale factor must be > 0, got {factor}")
    for group in optimizer.param_groups:
        for key in _LR_KEYS:
            if isinstance(group.get(key), (int, float)):
                group[key] = group[key] * factor
    if schedule is not None:
        inner = schedule.scheduler
        if hasattr(inner, "base_lrs"):
            inner.base_lrs = [lr * factor for lr in inner.base_lrs]
        if hasattr(inner, "_last_lr"):
            inner._last_lr = [float(g["lr"]) for g in optimizer.param_groups]

"""The LR range test (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.algorithms.finders._state import LossFn, preserved, train_step
from kiln.train.engine import Engine


@dataclass
class LRFindResult:
    """What :func:`lr_find` measured.

    Attributes:
        lrs: The LR of each recorded step (of the first parameter group's multiplier 1).
        losses: The raw training loss of each step.
        smoothed: The bias-corrected exponential moving average of ``losses``.
        suggestion: The suggested LR (see :func:`suggest_lr`), None when too few steps ran.
        stopped_early: Whether the sweep stopped before ``end_lr`` (divergence or a non-finite
            loss).
        lr_at_min: The LR of the smallest smoothed loss after the skipped start (the
            "minimum / 10" rule of thumb divides it by 10), None when no step was recorded.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    stopped_early: bool = False
    lr_at_min: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, ready for ``json.dumps``."""
        return asdict(self)

    def plot(self, path: str | Path) -> Path:
        """Save the loss against the LR (log scale) as a PNG, marking the suggestion.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change); install
        matplotlib (``pip install matplotlib`` or the ``all`` extra) to use it.

        Args:
            path: Where to write the PNG; parent folders are created.

        Returns:
            The path written.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "plotting the LR range test needs matplotlib: pip install matplotlib "
                "(or pip install 'kiln[all]')"
            ) from exc
        fig = Figure(figsize=(6.4, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", linewidth=2, label="smoothed loss")
        if self.suggestion is not None:
            ax.axvline(
                self.suggestion,
                color="C3",
                linestyle="--",
                label=f"suggestion {self.suggestion:.3g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("LR range test" + (" (stopped: diverged)" if self.stopped_early else ""))
        if self.smoothed:  # keep the divergence from squashing the useful part of the curve
            low, first = min(self.losses + self.smoothed), self.smoothed[0]
            pad = 0.1 * abs(first - low) + 1e-12
            ax.set_ylim(low - pad, first + 3 * pad)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        return out


def suggest_lr(
    lrs: Sequence[float], smoothed: Sequence[float], *, skip_start: int = 0, window: int = 1
) -> float | None:
    """The LR where the smoothed loss falls fastest, before its minimum.

    Rule: take the points from ``skip_start`` up to the minimum of the smoothed loss (after
    ``skip_start``); at each,
    the slope of the smoothed loss against ``log(lr)`` is the difference quotient between the
    points ``window`` before and after it (clipped to that range); return the LR of the most
    negative slope. When the range has fewer than 3 points, or the loss never falls, return
    the LR of the minimum divided by 10 (the other common rule of thumb). Stopping at the
    minimum keeps the answer below the region where the loss rises; the window (a few steps)
    and the skipped start keep the noise of the first, barely averaged, points from winning.

    Args:
        lrs: The swept LRs, increasing.
        smoothed: The smoothed loss at each LR.
        skip_start: Points to ignore at the start.
        window: Points on each side of the slope's difference quotient, >= 1.

    Returns:
        The suggested LR, or None when there are no points.

    Example:
        >>> lrs = [10.0**e for e in range(-6, 1)]
        >>> suggest_lr(lrs, [2.0, 2.0, 1.9, 1.2, 0.6, 0.5, 3.0])
        0.001
    """
    if not lrs:
        return None
    start = min(max(skip_start, 0), len(lrs) - 1)
    i_min = _argmin_after(smoothed, start)
    xs = [math.log(lr) for lr in lrs[start : i_min + 1]]
    ys = smoothed[start : i_min + 1]
    last, k = len(xs) - 1, max(window, 1)
    if last >= 2:
        slopes = []
        for i in range(last + 1):
            lo, hi = max(i - k, 0), min(i + k, last)
            slopes.append((ys[hi] - ys[lo]) / (xs[hi] - xs[lo]))
        best = min(range(len(slopes)), key=slopes.__getitem__)
        if slopes[best] < 0:
            return float(lrs[start + best])
    return float(lrs[i_min]) / 10


def _argmin_after(values: Sequence[float], skip: int) -> int:
    """Index of the smallest value, ignoring the first ``skip`` (at least the last is kept)."""
    start = min(max(skip, 0), len(values) - 1)
    return min(range(start, len(values)), key=values.__getitem__)


def _lr_multipliers(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's LR relative to the swept LR: Kiln's ``lr_mult``, else relative to group 0."""
    groups = optimizer.param_groups
    ref = float(groups[0]["lr"])
    mults = []
    for g in groups:
        if "lr_mult" in g:
            mults.append(float(g["lr_mult"]))
        else:
            mults.append(float(g["lr"]) / ref if ref else 1.0)
    return mults


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, mults: Sequence[float]) -> None:
    for g, m in zip(optimizer.param_groups, mults, strict=True):
        if isinstance(g["lr"], torch.Tensor):  # a tensor LR (capturable/compiled optimizers)
            g["lr"].fill_(lr * m)
        else:
            g["lr"] = lr * m


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Batches of ``loader``, starting it again whenever it runs out."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yielded no batch; give lr_find a non-empty loader")


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    engine: Engine | None = None,
) -> LRFindResult:
    """LR range test: train with an exponentially growing LR and watch the loss.

    Step ``i`` (0-based) of ``num_steps`` uses ``lr_i = start_lr * (end_lr / start_lr) **
    (i / (num_steps - 1))``; every parameter group keeps its LR ratio (Kiln's ``lr_mult``, or
    its LR relative to the first group). The recorded loss is smoothed with a bias-corrected
    moving average, ``avg = smoothing * avg + (1 - smoothing) * loss``, ``smoothed_i = avg /
    (1 - smoothing ** (i + 1))``. The sweep stops after the first step whose smoothed loss
    exceeds ``diverge_factor`` times the best so far, or before recording a non-finite loss.
    Each step reads the loss on the host (one sync per step), which the stop rule needs.
    Afterwards the model, gradients, optimizer (state and LRs), Engine counters and global RNGs
    are restored exactly (see :func:`preserved`).

    Args:
        model: The model to train (the one returned by ``engine.setup`` when using an Engine).
        optimizer: Its optimizer; its own LR values are ignored during the sweep.
        loader: Yields ``(inputs, targets)``; started again when shorter than ``num_steps``.
            Without an Engine the batches must already be on the model's device.
        loss_fn: ``loss_fn(outputs, targets) -> scalar loss``.
        start_lr: The first LR, > 0.
        end_lr: The last LR, > ``start_lr``.
        num_steps: Updates in the sweep, >= 2.
        smoothing: The moving-average factor, in [0, 1).
        diverge_factor: Stop when the smoothed loss exceeds this times its minimum, > 1.
        engine: Use its device placement, autocast, loss scaling, clipping and update; one
            micro-batch per update (accumulation does not apply to the sweep).

    Returns:
        The swept LRs, raw and smoothed losses and the suggestion (:func:`suggest_lr`, skipping
        the first 10% of the planned steps, slopes over ``num_steps // 25`` steps each side).

    Raises:
        ValueError: A bad argument, or an empty loader.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> r = lr_find(model, opt, data, nn.functional.mse_loss, end_lr=1.0, num_steps=10)
        >>> [f"{lr:.0e}" for lr in r.lrs[:3]]
        ['1e-07', '6e-07', '4e-06']
    """
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise ValueError(
            f"need 0 < start_lr < end_lr (finite), got start_lr={start_lr}, end_lr={end_lr}; "
            "a typical range is start_lr=1e-7, end_lr=10"
        )
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 updates, got {num_steps}; try 100")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}; fastai uses 0.98")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor}; 4 is common")
    ratio = end_lr / start_lr
    schedule = [start_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]
    mults = _lr_multipliers(optimizer)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stopped = False
    avg, best = 0.0, math.inf
    with preserved(model, optimizer, engine):
        model.train()
        batches = _cycle(loader)
        for i, lr in enumerate(schedule):
            _set_lr(optimizer, lr, mults)
            value = float(train_step(model, optimizer, next(batches), loss_fn, engine))
            if not math.isfinite(value):
                stopped = True
                break
            avg = smoothing * avg + (1 - smoothing) * value
            smooth = avg / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            best = min(best, smooth)
            if smooth > diverge_factor * best:
                stopped = i < num_steps - 1
                break
    skip = num_steps // 10
    suggestion = suggest_lr(lrs, smoothed, skip_start=skip, window=max(1, num_steps // 25))
    at_min = lrs[_argmin_after(smoothed, skip)] if lrs else None
    return LRFindResult(lrs, losses, smoothed, suggestion, stopped, at_min)


# --------------------------------------------------------------------------- batch size

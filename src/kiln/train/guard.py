"""Non-finite losses and gradients: what ``train.nonfinite`` does about a bad update.

The train step only finds out (``kiln.train.step``); this module decides and acts, as plain
functions of the values they use:

* :func:`verdict`: ``skip``, ``rollback`` or ``stop`` for this bad update, escalating to ``stop``
  after ``train.max_consecutive_skips`` skips in a row or ``train.max_rollbacks`` rollbacks, with
  advice that names only what is left to try.
* :func:`rollback`: load the last checkpoint into the parts and return its loop state, with the
  LRs scaled by ``train.rollback_lr_factor`` once more.
* :func:`stop_message`: ``train.nonfinite=stop`` (the default) saves the weights from before the
  bad update and raises :class:`NonFiniteError` with this text; the diagnosis in it (the
  parameters whose gradients went non-finite, the first module whose output did) is
  :mod:`kiln.train.diagnosis`, which runs on :mod:`kiln.train.nonfinite` (that module imports
  :class:`NonFiniteError` from here, so the locators are not imported here).

Example:
    >>> from kiln.config import TrainConfig
    >>> cfg = TrainConfig(nonfinite="skip")
    >>> v = verdict(cfg, LoopState(), updates=7)
    >>> v.action, v.streak
    ('skip', (7, 1))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.train import snapshots
from kiln.train.build import Parts
from kiln.train.loop_state import LoopState
from kiln.train.schedules import scale_lrs

__all__ = [
    "NonFiniteError",
    "Verdict",
    "rollback",
    "rollback_line",
    "skip",
    "stop_message",
    "verdict",
]


class NonFiniteError(KilnError, RuntimeError):
    """Training met a NaN/Inf loss or gradient and ``train.nonfinite`` said to stop."""


@dataclass(frozen=True)
class Verdict:
    """What to do about one non-finite update.

    Attributes:
        action: ``skip``, ``rollback`` or ``stop``.
        advice: for ``stop``, what the user may still try (ends the error message).
        streak: the new ``(engine.updates at the last skip, skips in a row)``.
    """

    action: str
    advice: str
    streak: tuple[int, int]


def verdict(cfg: Any, state: LoopState, updates: int) -> Verdict:
    """Apply ``train.nonfinite`` to a non-finite update.

    ``skip`` gives up after ``train.max_consecutive_skips`` bad updates in a row and ``rollback``
    after ``train.max_rollbacks`` rollbacks: both then stop like ``stop`` does, and the advice
    names only what is left to try.

    Args:
        cfg: the ``train`` section of the config.
        state: the loop's counters (rollbacks and skips so far, the skip streak); not changed.
        updates: optimizer updates the Engine has taken.
    """
    rollbacks, skipped, streak = state.rollbacks, state.nonfinite_skipped, state.skip_streak
    policy = cfg.nonfinite
    advice = "set train.clip_norm, or set train.nonfinite=skip|rollback"
    if policy == "rollback" and rollbacks >= cfg.max_rollbacks:
        policy = "stop"
        advice = (
            f"set train.clip_norm, raise train.max_rollbacks (now {cfg.max_rollbacks}) or lower "
            f"train.rollback_lr_factor (now {cfg.rollback_lr_factor:g}), or try "
            "train.nonfinite=skip"
        )
    if policy == "skip":
        # A streak is the skips since the last update the optimizer took.
        mark, count = streak
        count = count + 1 if mark == updates else 1
        streak = (updates, count)
        if count < cfg.max_consecutive_skips:
            return Verdict("skip", "", streak)
        policy = "stop"
        advice = (
            f"set train.clip_norm, or raise train.max_consecutive_skips (now "
            f"{cfg.max_consecutive_skips}) if the bad updates come in short bursts, or try "
            f"train.nonfinite=rollback; {count} updates in a row were non-finite "
            f"({skipped} skipped before)"
        )
    return Verdict(policy, advice, streak)


def rollback(
    parts: Parts, state: LoopState, checkpoint: Path | None, *, factor: float
) -> LoopState:
    """Load ``checkpoint`` into the parts; the loop state to continue from.

    The LRs become the checkpoint's times ``state.lr_scale * factor``; the rollback and skip
    counts carry on from ``state`` (they count the whole run, not the checkpoint's past).

    Raises:
        NonFiniteError: there is no checkpoint to roll back to.
    """
    parts.engine.zero_grad(parts.optimizer)
    if checkpoint is None:
        raise NonFiniteError(f"non-finite update at step {state.step + 1} with no checkpoint")
    target = state.lr_scale * factor
    restored, _ = snapshots.restore(parts, checkpoint)
    scale_lrs(parts.optimizer, parts.scheduler, target / restored.lr_scale)
    restored.lr_scale, restored.rollbacks = target, state.rollbacks + 1
    restored.nonfinite_skipped, restored.skip_streak = state.nonfinite_skipped, state.skip_streak
    restored.resumed_from = state.resumed_from
    return restored


def skip(parts: Parts, state: LoopState) -> None:
    """Drop the bad update's gradients; its slot passes (like a GradScaler skip) and counts."""
    parts.engine.zero_grad(parts.optimizer)
    state.nonfinite_skipped += 1
    state.step += 1


def rollback_line(checkpoint: Path, state: LoopState, max_rollbacks: int) -> str:
    """The line printed after a rollback to ``checkpoint`` (``state`` is the restored one)."""
    return (
        f"non-finite loss or gradient: rolled back to {checkpoint.name} (step {state.step}) "
        f"with LRs x{state.lr_scale:g} (rollback {state.rollbacks}/{max_rollbacks})"
    )


def stop_message(state: LoopState, *, where: str, saved: Path, advice: str) -> str:
    """The :class:`NonFiniteError` text of ``train.nonfinite=stop`` at ``state``'s position.

    Example:
        >>> s = LoopState(epoch=0, batch_in_epoch=3, step=2)
        >>> stop_message(s, where="x", saved=Path("step-2.ckpt"), advice="y")[:48]
        'non-finite loss or gradient at step 3 (epoch 1, '
    """
    after = f" after {state.rollbacks} rollbacks" if state.rollbacks else ""
    return (
        f"non-finite loss or gradient at step {state.step + 1} (epoch {state.epoch + 1}, "
        f"batch {state.batch_in_epoch}){after}: {where}; the weights before it are saved in "
        f"{saved}. Lower optim.lr, {advice}"
    )

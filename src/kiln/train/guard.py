"""Non-finite losses and gradients: the error the trainer raises and the diagnosis it gives.

``train.nonfinite=stop`` (the default) saves the weights from before the bad update and raises
:class:`NonFiniteError`, naming the parameters whose gradients went non-finite and the first
module whose output did, so the user knows where to look.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.algorithms.nonfinite import first_nonfinite_module, nonfinite_grads
from kiln.errors import KilnError
from kiln.train import snapshots
from kiln.train.schedules import scale_lrs

if TYPE_CHECKING:
    from kiln.train.trainer import Trainer

__all__ = ["NonFiniteError", "describe_nonfinite", "handle_nonfinite"]


class NonFiniteError(KilnError, RuntimeError):
    """Training met a NaN/Inf loss or gradient and ``train.nonfinite`` said to stop."""


def describe_nonfinite(model: nn.Module, x: Any, bad_grads: list[str]) -> str:
    """A short text naming where the non-finite values are.

    Args:
        model: the unwrapped model (its train/eval mode is used as it is).
        x: the batch of the bad update; one more forward pass runs on it (no grad).
        bad_grads: parameter names whose gradients were non-finite (read before zeroing them).
    """
    parts = []
    try:
        hit = first_nonfinite_module(model, x)
    except Exception as exc:  # diagnosis must never hide the original problem
        hit = None
        parts.append(f"(re-running the batch to find the module failed: {exc})")
    if hit is not None:
        name, cls = hit
        if name == "<input>":
            parts.insert(0, "the input batch itself holds NaN/Inf (check the data)")
        else:
            parts.insert(0, f"first non-finite output in module {name!r} ({cls})")
    if bad_grads:
        shown = ", ".join(bad_grads[:3]) + (", ..." if len(bad_grads) > 3 else "")
        parts.append(f"non-finite gradients in {len(bad_grads)} parameters ({shown})")
    if not parts:
        parts.append("the forward pass is finite on a re-run, so the loss itself overflowed")
    return "; ".join(parts)


def handle_nonfinite(self: Trainer, x: torch.Tensor) -> str:
    """Apply ``train.nonfinite`` to a non-finite update; returns ``skip`` or ``rollback``.

    ``skip`` gives up after ``train.max_consecutive_skips`` bad updates in a row and ``rollback``
    after ``train.max_rollbacks`` rollbacks: both then stop like ``stop`` does, and the message
    advises only what is left to try.
    """
    cfg = self.cfg.train
    policy = cfg.nonfinite
    advice = "set train.clip_norm, or set train.nonfinite=skip|rollback"
    if policy == "rollback" and self.rollbacks >= cfg.max_rollbacks:
        policy = "stop"
        advice = (
            f"set train.clip_norm, raise train.max_rollbacks (now {cfg.max_rollbacks}) or lower "
            f"train.rollback_lr_factor (now {cfg.rollback_lr_factor:g}), or try "
            "train.nonfinite=skip"
        )
    if policy == "skip":
        # A streak is the skips since the last update the optimizer took.
        mark, streak = self._skip_streak
        streak = streak + 1 if mark == self.engine.updates else 1
        self._skip_streak = (self.engine.updates, streak)
        if streak < cfg.max_consecutive_skips:
            self.engine.zero_grad(self.optimizer)
            self.nonfinite_skipped += 1
            self.step += 1  # the update's slot passes, like a GradScaler skip
            return "skip"
        policy = "stop"
        advice = (
            f"set train.clip_norm, or raise train.max_consecutive_skips (now "
            f"{cfg.max_consecutive_skips}) if the bad updates come in short bursts, or try "
            f"train.nonfinite=rollback; {streak} updates in a row were non-finite "
            f"({self.nonfinite_skipped} skipped before)"
        )
    if policy == "rollback":
        last = self.ckpts.last()
        self.engine.zero_grad(self.optimizer)
        if last is None:
            raise NonFiniteError(f"non-finite update at step {self.step + 1} with no checkpoint")
        target = self.lr_scale * cfg.rollback_lr_factor
        count, skipped = self.rollbacks, self.nonfinite_skipped
        snapshots.restore(self, last)  # sets lr_scale to the checkpoint's
        scale_lrs(self.optimizer, self.scheduler, target / self.lr_scale)
        self.lr_scale, self.rollbacks, self.nonfinite_skipped = target, count + 1, skipped
        if self.verbose and self.is_zero:
            print(
                f"non-finite loss or gradient: rolled back to {last.name} (step {self.step}) "
                f"with LRs x{target:g} (rollback {self.rollbacks}/{cfg.max_rollbacks})",
                flush=True,
            )
        self.logger.log({"train/rollbacks": self.rollbacks}, step=self.step)
        return "rollback"
    bad_grads = nonfinite_grads(self.engine.model)  # type: ignore[arg-type]
    self.engine.zero_grad(self.optimizer)
    path = self._save()  # the state before the bad update
    where = describe_nonfinite(self.engine.model, x, bad_grads)  # type: ignore[arg-type]
    after = f" after {self.rollbacks} rollbacks" if self.rollbacks else ""
    raise NonFiniteError(
        f"non-finite loss or gradient at step {self.step + 1} (epoch {self.epoch + 1}, "
        f"batch {self.batch_in_epoch}){after}: {where}; the weights before it are saved in "
        f"{path}. Lower optim.lr, {advice}"
    )

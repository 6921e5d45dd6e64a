"""Non-finite losses and gradients: the error the trainer raises and the diagnosis it gives.

``train.nonfinite=stop`` (the default) saves the weights from before the bad update and raises
:class:`NonFiniteError`, naming the parameters whose gradients went non-finite and the first
module whose output did, so the user knows where to look.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.algorithms.nonfinite import first_nonfinite_module, nonfinite_grads
from kiln.errors import KilnError
from kiln.train import snapshots
from kiln.train.checkpoint import load_checkpoint
from kiln.train.schedules import scale_lrs

if TYPE_CHECKING:
    from kiln.train.trainer import Trainer

__all__ = [
    "NonFiniteError",
    "check_final_metrics",
    "describe_nonfinite",
    "final_weights_problem",
    "finite_weights",
    "handle_nonfinite",
]


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


# ------------------------------------------------------------------ the end of a fit


def _nonfinite_tensors(model: nn.Module) -> list[str]:
    return [
        n
        for n, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def finite_weights(self: Trainer) -> bool:
    """Whether the live model's weights are all finite (True for sharded FSDP models, whose
    ranks must agree on saving: their checkpoints are checked when they are written out)."""
    if snapshots.sharded(self):
        return True
    return not _nonfinite_tensors(self.engine.model)  # type: ignore[arg-type]


def _last_finite_checkpoint(self: Trainer) -> str | None:
    for name in reversed(self.ckpts.index["saved"]):
        path = self.ckpts.dir / name
        try:
            model = load_checkpoint(path, map_location="cpu").get("model")
        except Exception:  # an unreadable file is simply not a candidate here
            continue
        if model and all(
            bool(torch.isfinite(t).all()) for t in model.values() if t.is_floating_point()
        ):
            return str(path)
    return None


def final_weights_problem(self: Trainer, final: nn.Module) -> str | None:
    """Why the final weights must not become model.safetensors (they hold NaN/Inf), or None.

    The message names the tensors, the policy that let them through and the newest checkpoint
    whose weights are still finite (left as it was); the caller raises it as
    :class:`NonFiniteError` on every rank.
    """
    bad = _nonfinite_tensors(final)
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    good = _last_finite_checkpoint(self)
    kept = (
        f"the newest checkpoint with finite weights is {good}"
        if good
        else "no checkpoint holds finite weights"
    )
    why = (
        "train.nonfinite=ignore let non-finite updates through: use stop, skip or rollback"
        if self.cfg.train.nonfinite == "ignore"
        else "lower optim.lr or set train.clip_norm"
    )
    return (
        f"the final weights hold NaN/Inf in {len(bad)} tensors ({shown}), so "
        f"{self.run_dir / 'model.safetensors'} was not written ({kept}); {why}"
    )


def check_final_metrics(self: Trainer, splits: dict[str, dict[str, float]]) -> None:
    """Raise when the final weights give a non-finite loss on the validation or test split.

    Raises:
        NonFiniteError: with the skipped and rolled-back update counts of the run.
    """
    for split, metrics in splits.items():
        bad = {k: v for k, v in metrics.items() if "loss" in k and not math.isfinite(v)}
        if not bad:
            continue
        k, v = next(iter(bad.items()))
        history = f"{self.nonfinite_skipped} of {self.step} updates were skipped as non-finite"
        if self.rollbacks:
            history += f" and {self.rollbacks} rollbacks were made"
        raise NonFiniteError(
            f"the final weights give a non-finite {split} {k} ({v}); {history} "
            f"(train.nonfinite={self.cfg.train.nonfinite}). The model is not usable: check the "
            f"{split} data for NaN/Inf, lower optim.lr or set train.clip_norm; the metrics are in "
            f"{self.run_dir / 'summary.json'}"
        )

"""Checks at the end of a fit: never write or report non-finite final weights as a success.

* :func:`nonfinite_tensors`: the state-dict entries of a model that hold NaN/Inf.
* :func:`final_weights_problem`: why the final weights must not become ``model.safetensors``
  (they hold NaN/Inf), naming the newest checkpoint whose weights are still finite.
* :func:`check_final_metrics`: a non-finite validation or test loss of the final weights is an
  error, not a quiet exit 0.

Plain functions of the values they need (no trainer), so each is tested alone.

Example:
    >>> from torch import nn
    >>> nonfinite_tensors(nn.Linear(2, 2))
    []
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from kiln.train.checkpoint import load_checkpoint
from kiln.train.guard import NonFiniteError

__all__ = ["check_final_metrics", "final_weights_problem", "nonfinite_tensors"]


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point state-dict entries of ``model`` that hold NaN/Inf."""
    return [
        n
        for n, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def last_finite_checkpoint(checkpoints: list[Path]) -> Path | None:
    """The newest of ``checkpoints`` (oldest first) whose model weights are all finite."""
    for path in reversed(checkpoints):
        try:
            model = load_checkpoint(path, map_location="cpu").get("model")
        except Exception:  # an unreadable file is simply not a candidate here
            continue
        if model and all(
            bool(torch.isfinite(t).all()) for t in model.values() if t.is_floating_point()
        ):
            return path
    return None


def final_weights_problem(
    final: nn.Module, *, checkpoints: list[Path], policy: str, run_dir: Path
) -> str | None:
    """Why the final weights must not become model.safetensors (they hold NaN/Inf), or None.

    Args:
        final: the weights that would be written.
        checkpoints: the run's checkpoint files, oldest first.
        policy: ``train.nonfinite`` (the advice depends on it).
        run_dir: the run directory (named in the message).

    The message names the tensors, the policy that let them through and the newest checkpoint
    whose weights are still finite (left as it was); the caller raises it as
    :class:`NonFiniteError` on every rank.
    """
    bad = nonfinite_tensors(final)
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    good = last_finite_checkpoint(checkpoints)
    kept = (
        f"the newest checkpoint with finite weights is {good}"
        if good
        else "no checkpoint holds finite weights"
    )
    why = (
        "train.nonfinite=ignore let non-finite updates through: use stop, skip or rollback"
        if policy == "ignore"
        else "lower optim.lr or set train.clip_norm"
    )
    return (
        f"the final weights hold NaN/Inf in {len(bad)} tensors ({shown}), so "
        f"{run_dir / 'model.safetensors'} was not written ({kept}); {why}"
    )


def check_final_metrics(
    splits: dict[str, dict[str, float]],
    *,
    skipped: int,
    rollbacks: int,
    steps: int,
    policy: str,
    run_dir: Path,
) -> None:
    """Raise when the final weights give a non-finite loss on the validation or test split.

    Raises:
        NonFiniteError: with the skipped and rolled-back update counts of the run.
    """
    for split, metrics in splits.items():
        bad = {k: v for k, v in metrics.items() if "loss" in k and not math.isfinite(v)}
        if not bad:
            continue
        k, v = next(iter(bad.items()))
        history = f"{skipped} of {steps} updates were skipped as non-finite"
        if rollbacks:
            history += f" and {rollbacks} rollbacks were made"
        raise NonFiniteError(
            f"the final weights give a non-finite {split} {k} ({v}); {history} "
            f"(train.nonfinite={policy}). The model is not usable: check the "
            f"{split} data for NaN/Inf, lower optim.lr or set train.clip_norm; the metrics are in "
            f"{run_dir / 'summary.json'}"
        )

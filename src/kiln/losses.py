"""Loss functions by name, shaped for each task.

``auto`` picks cross-entropy for classification and language modelling, MSE for regression.
Language-model logits ``[B, T, V]`` are flattened to ``[B*T, V]`` against targets ``[B, T]``.

Example:
    >>> import torch
    >>> from kiln.config import LossConfig
    >>> loss_fn = build_loss(LossConfig(), task="classification")
    >>> float(loss_fn(torch.zeros(2, 4), torch.tensor([0, 3])))  # ln 4
    1.3862943649291992
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from kiln.config import LossConfig

LossFn = Callable[..., torch.Tensor]


def _lm_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def _regression(
    fn: LossFn, out: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    if out.shape != target.shape:
        if out.numel() != target.numel():
            raise ValueError(
                f"regression output shape {tuple(out.shape)} does not match targets "
                f"{tuple(target.shape)}; set the model's out_features to the number of targets"
            )
        out = out.reshape(target.shape)
    return fn(out.float(), target.float(), reduction=reduction)


def build_loss(cfg: LossConfig, *, task: str) -> LossFn:
    """A callable ``loss(output, target, reduction="mean")`` for ``task``."""
    name = cfg.name
    if name == "auto":
        name = "mse" if task == "regression" else "cross_entropy"
    if name == "cross_entropy":
        if task == "regression":
            raise ValueError("loss.name=cross_entropy needs class targets; this data is regression")
        if task == "lm":
            return partial(_lm_cross_entropy, label_smoothing=cfg.label_smoothing)
        return partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
    if task != "regression":
        raise ValueError(f"loss.name={name} is a regression loss but the task is {task}")
    fns: dict[str, LossFn] = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}
    return partial(_regression, fns[name])

"""Loss functions: the ones a config names, and the pair/triplet/multi-task ones a loop calls.

Two kinds live here:

* **Config losses** (:data:`LOSSES`, built by :func:`build_loss`): ``cross_entropy``,
  ``weighted_cross_entropy``, ``focal``, ``mse``, ``l1``, ``smooth_l1``; ``auto`` picks
  cross-entropy for classification and language modelling, MSE for regression. Each built loss is
  called as ``loss(output, target, reduction="mean" | "sum" | "none")``. Classification takes
  logits ``[N, C]`` against class indices ``[N]`` or, for cross-entropy and weighted
  cross-entropy, soft targets ``[N, C]`` (what mixup/cutmix produce); language-model logits
  ``[B, T, V]`` are flattened to ``[B*T, V]`` against targets ``[B, T]``.
* **Library losses** the supervised trainer cannot feed, because they need pairs or triplets of
  examples: :func:`contrastive_loss`, :func:`cosine_embedding_loss`, :func:`triplet_loss`, and
  :class:`MultiTaskLoss` (learned uncertainty weights over several task losses). Call them in your
  own loop (``examples/siamese_pairs.py``), and :func:`soft_cross_entropy` for a loop that
  mixes its own batches (:mod:`kiln.algorithms.mixing`).

Every loss checks the shapes and dtypes it is given and says what it expected. Weighted losses
(``weighted_cross_entropy``, ``focal``) average over samples: ``mean == sum / N``, not PyTorch's
division by the summed weights of the targets, so hard and soft targets agree, gradient
accumulation over micro-batches is exact, and the evaluation loss (``sum / N``) is the training
loss.

Example:
    >>> import torch
    >>> from kiln.config import LossConfig
    >>> loss_fn = build_loss(LossConfig(), task="classification")
    >>> float(loss_fn(torch.zeros(2, 4), torch.tensor([0, 3])))  # ln 4
    1.3862943649291992
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from kiln.config import LossConfig, did_you_mean
from kiln.losses._common import LossFactory, LossFn, _as_weight, _check_class_targets
from kiln.losses.classification import (
    class_weights_from_counts,
    focal_loss,
    soft_cross_entropy,
    weighted_cross_entropy,
)
from kiln.losses.multitask import MultiTaskCriterion, MultiTaskLoss
from kiln.losses.pairs import contrastive_loss, cosine_embedding_loss, triplet_loss

__all__ = [
    "LOSSES",
    "LossFactory",
    "LossFn",
    "MultiTaskCriterion",
    "MultiTaskLoss",
    "build_loss",
    "class_weights_from_counts",
    "contrastive_loss",
    "cosine_embedding_loss",
    "focal_loss",
    "soft_cross_entropy",
    "triplet_loss",
    "weighted_cross_entropy",
]

#: A built loss: ``loss(output, target, reduction="mean")`` -> tensor.


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


def _cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float,
    lm: bool,
    reduction: str = "mean",
) -> torch.Tensor:
    # Checked, then F.cross_entropy as it always was: classification logits are [N, C] (3-D
    # logits would put the classes on dim 1 there); LM logits [B, T, V] are flattened.
    dims = (2, 3) if lm else (2,)
    _check_class_targets("cross-entropy", logits, target, soft_ok=True, dims=dims)
    if lm:
        v = logits.size(-1)
        soft = target.is_floating_point()
        logits, target = (
            logits.reshape(-1, v),
            target.reshape(-1, v) if soft else target.reshape(-1),
        )
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)


def _class_task(name: str, task: str) -> None:
    if task == "regression":
        raise ValueError(f"loss.name={name} needs class targets; this data is regression")


def _no_class_weights(cfg: LossConfig, name: str) -> None:
    if cfg.class_weights is not None:
        raise ValueError(
            f"loss.class_weights is set but loss.name={name} does not use it; use "
            f"loss.name=weighted_cross_entropy or focal, or remove class_weights"
        )


def _resolve_weights(
    cfg: LossConfig, name: str, class_counts: torch.Tensor | None
) -> torch.Tensor | None:
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "auto":
        if class_counts is None:
            raise ValueError(
                f"loss.name={name} with class_weights=auto needs the training split's class "
                f"counts (build_loss(..., class_counts=...)); give loss.class_weights as a list"
            )
        return class_weights_from_counts(class_counts)
    w = _as_weight(f"loss.name={name}", cfg.class_weights)
    if class_counts is not None and w.numel() != torch.as_tensor(class_counts).numel():
        raise ValueError(
            f"loss.class_weights has {w.numel()} entries but the data has "
            f"{torch.as_tensor(class_counts).numel()} classes; give one weight per class"
        )
    return w


class _OnDevice:
    """Calls ``fn(out, target, weight, ...)`` with ``weight`` moved once to the output's device."""

    def __init__(self, fn: LossFn, weight: torch.Tensor | None, **kwargs: object) -> None:
        self.fn, self.weight, self.kwargs = fn, weight, kwargs

    def __call__(
        self, out: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        if self.weight is not None and self.weight.device != out.device:
            self.weight = self.weight.to(out.device)  # once, not a host->device copy per step
        return self.fn(out, target, self.weight, reduction=reduction, **self.kwargs)


def _build_cross_entropy(cfg: LossConfig, task: str, class_counts: torch.Tensor | None) -> LossFn:
    _class_task("cross_entropy", task)
    _no_class_weights(cfg, "cross_entropy")
    return partial(_cross_entropy, label_smoothing=cfg.label_smoothing, lm=task == "lm")


def _build_weighted_cross_entropy(
    cfg: LossConfig, task: str, class_counts: torch.Tensor | None
) -> LossFn:
    _class_task("weighted_cross_entropy", task)
    if cfg.class_weights is None:
        raise ValueError(
            "loss.name=weighted_cross_entropy needs loss.class_weights: auto (inverse train "
            "frequencies) or a list with one weight per class"
        )
    weight = _resolve_weights(cfg, "weighted_cross_entropy", class_counts)
    return _OnDevice(weighted_cross_entropy, weight, label_smoothing=cfg.label_smoothing)


def _focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: torch.Tensor | None,
    *,
    gamma: float,
    label_smoothing: float,
    reduction: str = "mean",
) -> torch.Tensor:
    return focal_loss(
        logits,
        target,
        gamma=gamma,
        alpha=alpha,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def _build_focal(cfg: LossConfig, task: str, class_counts: torch.Tensor | None) -> LossFn:
    _class_task("focal", task)
    alpha = _resolve_weights(cfg, "focal", class_counts)
    return _OnDevice(_focal, alpha, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)


def _regression_factory(name: str, fn: LossFn) -> LossFactory:
    def factory(cfg: LossConfig, task: str, class_counts: torch.Tensor | None) -> LossFn:
        if task != "regression":
            raise ValueError(f"loss.name={name} is a regression loss but the task is {task}")
        _no_class_weights(cfg, name)
        return partial(_regression, fn)

    return factory


#: Config losses: ``loss.name`` -> ``factory(cfg, task, class_counts)``. Pair, triplet and
#: multi-task losses are not here: they need batches the supervised trainer does not make.
LOSSES: dict[str, LossFactory] = {
    "cross_entropy": _build_cross_entropy,
    "weighted_cross_entropy": _build_weighted_cross_entropy,
    "focal": _build_focal,
    "mse": _regression_factory("mse", F.mse_loss),
    "l1": _regression_factory("l1", F.l1_loss),
    "smooth_l1": _regression_factory("smooth_l1", F.smooth_l1_loss),
}


def build_loss(cfg: LossConfig, *, task: str, class_counts: torch.Tensor | None = None) -> LossFn:
    """A callable ``loss(output, target, reduction="mean")`` for ``task``.

    Args:
        cfg: The loss config (``loss.name``, ``label_smoothing``, ``class_weights``, ``gamma``).
        task: ``classification``, ``regression`` or ``lm``.
        class_counts: Examples per class ``[C]`` in the training split; needed only for
            ``class_weights=auto`` (and used to check the length of a weight list).

    Returns:
        The loss function; ``reduction`` is ``mean`` (over samples, or tokens for ``lm``),
        ``sum`` or ``none``.

    Raises:
        ValueError: If the loss does not fit the task, ``class_weights`` is set for a loss that
            ignores it or is missing where needed, or ``auto`` weights have no counts.

    Example:
        >>> cfg = LossConfig(name="weighted_cross_entropy", class_weights="auto")
        >>> loss_fn = build_loss(cfg, task="classification", class_counts=torch.tensor([1, 3]))
        >>> loss_fn(torch.zeros(2, 2), torch.tensor([0, 1]), reduction="none")  # w = 1.5, 0.5
        tensor([1.0397, 0.3466])
    """
    if task not in ("classification", "regression", "lm"):
        raise ValueError(f"unknown task {task!r}; allowed: classification, regression, lm")
    name = cfg.name
    if name == "auto":
        name = "mse" if task == "regression" else "cross_entropy"
    if name not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r}; {did_you_mean(name, list(LOSSES))}allowed: {', '.join(LOSSES)}"
        )
    return LOSSES[name](cfg, task, class_counts)

"""Config sections for optional training techniques: mixing, EMA, SWA, freezing, early stop, meta.

Re-exported by :mod:`kiln.config`; import them from there. This module imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kiln.config.base import _Strict

__all__ = [
    "EMAConfig",
    "EarlyStopConfig",
    "FreezeConfig",
    "MetaConfig",
    "MixConfig",
    "SWAConfig",
]


class MixConfig(_Strict):
    """Mixup / CutMix on training batches (classification only).

    Enabled by a positive alpha. With both on, each mixed batch is CutMix with probability
    ``switch_prob``, else Mixup.
    """

    mixup_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) for Mixup; 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) for CutMix; 0 = off")
    prob: float = Field(1.0, ge=0.0, le=1.0, description="chance that a batch is mixed at all")
    switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="CutMix share when both are on")
    off_last_epochs: int = Field(0, ge=0, description="train the last N epochs unmixed")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class EMAConfig(_Strict):
    """Exponential moving average of the weights, validated, checkpointed and exported."""

    enabled: bool = False
    decay: float = Field(0.999, gt=0.0, lt=1.0)
    warmup: bool = Field(True, description="ramp the decay up as (1 + n) / (10 + n)")
    every: int = Field(1, ge=1, description="optimizer updates between EMA updates")
    evaluate: bool = Field(
        True, description="validate, select the best and save model.safetensors with EMA weights"
    )


class SWAConfig(_Strict):
    """Stochastic Weight Averaging (torch.optim.swa_utils): the final model is the average."""

    enabled: bool = False
    start_epoch: int | None = Field(
        None, ge=0, description="first averaged epoch (0-based); default: the last 25% of epochs"
    )
    lr: float | None = Field(None, gt=0.0, description="SWA learning rate; default: optim.lr / 10")
    anneal_epochs: int = Field(1, ge=0)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    update_bn: bool = Field(True, description="recompute BatchNorm statistics of the average")


class FreezeConfig(_Strict):
    """Freeze parameters by name glob, and unfreeze them group by group at chosen epochs.

    A pattern matches a parameter name (``fnmatch``) or a module name (the parameter's prefix),
    so ``stem`` and ``stem.*`` both freeze every parameter under ``stem``.
    """

    modules: list[str] = Field(default_factory=list, description="frozen from the start")
    unfreeze_at: dict[int, list[str]] = Field(
        default_factory=dict, description="epoch (0-based) -> patterns unfrozen at its start"
    )
    bn_eval: bool = Field(
        True, description="keep BatchNorm layers whose weights are frozen in eval"
    )


class EarlyStopConfig(_Strict):
    """Stop when the monitored metric has not improved for ``patience`` validations."""

    enabled: bool = False
    monitor: str | None = Field(None, description="default: checkpoint.monitor")
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class MetaConfig(_Strict):
    """Meta-learning (MAML) instead of supervised training: ``kiln train`` runs the meta loop.

    Tasks come from ``task`` (``sine``: the sine-wave regression of Finn et al. 2017).
    """

    enabled: bool = False
    method: Literal["maml", "fomaml"] = Field(
        "maml", description="maml: second-order meta-gradient; fomaml: first-order approximation"
    )
    task: Literal["sine"] = "sine"
    shots: int = Field(10, ge=1, le=100_000, description="support examples per task (K)")
    query: int = Field(10, ge=1, le=100_000, description="query examples per task")
    inner_steps: int = Field(1, ge=1, le=10_000)
    inner_lr: float = Field(0.01, gt=0.0)
    meta_batch: int = Field(25, ge=1, le=100_000, description="tasks per meta-update")
    meta_steps: int = Field(10000, ge=1, le=2**31 - 1, description="meta-updates")
    eval_tasks: int = Field(
        600, ge=1, le=1_000_000, description="held-out tasks for the final report"
    )
    eval_inner_steps: list[int] = Field(default_factory=lambda: [1, 10])

"""The training techniques a config switches on, built and checked in one place.

Each technique is a small object from :mod:`kiln.algorithms` (usable in a user's own loop);
this module only reads the config, refuses combinations that cannot work (with the reason and
the fix) and gathers the objects' states for checkpoints. The trainer calls the objects at
fixed points of its loop, so the step stays readable (see ``kiln.train.trainer``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kiln.algorithms.early_stopping import EarlyStopping
from kiln.algorithms.ema import EMA
from kiln.algorithms.freezing import Freezer
from kiln.algorithms.mixing import BatchMixer
from kiln.algorithms.swa import SWA
from kiln.config import Config
from kiln.data.base import DataInfo

__all__ = ["Techniques", "check_techniques"]


def check_techniques(cfg: Config, info: DataInfo, *, strategy: str, world: int) -> None:
    """Raise a clear ValueError for a technique the data, loss or strategy cannot support."""
    if cfg.mix.enabled:
        if info.task != "classification" or not info.num_classes:
            raise ValueError(
                f"mixup/cutmix need a classification task with classes; this data is {info.task} "
                "(set mix.mixup_alpha=0 and mix.cutmix_alpha=0)"
            )
        if cfg.loss.name not in ("auto", "cross_entropy", "weighted_cross_entropy"):
            raise ValueError(
                f"mixup/cutmix train on soft targets, which loss.name={cfg.loss.name} cannot take; "
                "use loss.name=cross_entropy"
            )
        if cfg.mix.cutmix_alpha > 0 and len(info.input_shape) != 3:
            raise ValueError(
                f"cutmix pastes image patches but the inputs have shape {tuple(info.input_shape)} "
                "(not C x H x W); use mix.mixup_alpha for non-image data (digits: "
                "data.layout=image)"
            )
    if strategy == "fsdp" and (cfg.ema.enabled or cfg.swa.enabled):
        raise ValueError(
            "EMA and SWA are not yet supported with strategy=fsdp (the shadow weights would be "
            "sharded); use strategy=ddp or one process"
        )
    if world > 1 and cfg.freeze.unfreeze_at:
        raise ValueError(
            "freeze.unfreeze_at (gradual unfreezing) is not yet supported with several "
            "processes: DDP fixes the set of trained parameters when it wraps the model; freeze "
            "statically with freeze.modules, or train in one process"
        )
    if world > 1 and cfg.train.auto_microbatch:
        raise ValueError(
            "train.auto_microbatch is not yet supported with several processes (every rank "
            "would have to agree on the new micro-batch); set data.batch_size and "
            "train.accumulate by hand, or find them with `kiln tune batch`"
        )
    if world > 1 and cfg.train.nonfinite == "rollback":
        raise ValueError(
            "train.nonfinite=rollback is not yet supported with several processes; use stop or skip"
        )


class Techniques:
    """The technique objects of one run (None where switched off) and their checkpoint state.

    Args:
        cfg: the run's config.
        info: what the data says (classes, input shape).
        model: the unwrapped model (EMA and SWA average its tensors).
        epochs: the run's length in epochs (mixing's ``off_last_epochs``, SWA's start).
        rank: this process's rank (offsets the mixing seed so ranks mix differently).
    """

    def __init__(
        self, cfg: Config, info: DataInfo, model: nn.Module, *, epochs: int, rank: int = 0
    ) -> None:
        m = cfg.mix
        self.mixer: BatchMixer | None = None
        if m.enabled:
            assert info.num_classes is not None  # check_techniques ran first
            self.mixer = BatchMixer(
                info.num_classes,
                mixup_alpha=m.mixup_alpha,
                cutmix_alpha=m.cutmix_alpha,
                prob=m.prob,
                switch_prob=m.switch_prob,
                off_last_epochs=m.off_last_epochs,
                epochs=epochs,
                seed=cfg.seed * 1000 + 17 + rank,
            )
        self.ema: EMA | None = None
        self.ema_every = cfg.ema.every
        if cfg.ema.enabled:
            self.ema = EMA(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup)
        self.swa: SWA | None = None
        if cfg.swa.enabled:
            start = cfg.swa.start_epoch
            if start is None:
                start = max(0, int(epochs * 0.75))
            if start >= epochs:
                raise ValueError(
                    f"swa.start_epoch={start} is not before the end of training "
                    f"(train.epochs={epochs}); lower it so some epochs are averaged"
                )
            self.swa = SWA(
                model,
                start_epoch=start,
                swa_lr=cfg.swa.lr or cfg.optim.lr / 10,
                anneal_epochs=cfg.swa.anneal_epochs,
                anneal_strategy=cfg.swa.anneal_strategy,
            )
        f = cfg.freeze
        self.freezer: Freezer | None = None
        if f.modules or f.unfreeze_at:
            self.freezer = Freezer(f.modules, f.unfreeze_at, bn_eval=f.bn_eval)
            self.freezer.check(model)
        self.early: EarlyStopping | None = None

    def begin_epoch(self, model: nn.Module, optimizer: Any, epoch: int) -> list[str]:
        """Freeze/unfreeze for ``epoch`` and let SWA take the LR over; the unfrozen names."""
        changed = self.freezer.apply(model, epoch) if self.freezer is not None else []
        if self.swa is not None:
            self.swa.begin_epoch(optimizer, epoch)
        return changed

    def swa_on(self, epoch: int) -> bool:
        """Whether SWA averages ``epoch`` (and its LR schedule replaces the run's)."""
        return self.swa is not None and self.swa.active(epoch)

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Average ``epoch`` into SWA when it is on; its metrics for the epoch record."""
        if self.swa is None or not self.swa.active(epoch):
            return {}
        self.swa.end_epoch(model, epoch)
        return {"swa/n_averaged": self.swa.n_averaged}

    def train_mode(self, model: nn.Module, unwrapped: nn.Module) -> None:
        """``model.train()``, keeping frozen BatchNorm layers in eval mode (``freeze.bn_eval``)."""
        model.train()
        if self.freezer is not None:
            self.freezer.train_mode(unwrapped)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mixer is not None:
            out["mixer"] = self.mixer.state_dict()
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        if self.swa is not None:
            out["swa"] = self.swa.state_dict()
        if self.early is not None:
            out["early_stop"] = self.early.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any], optimizer: Any) -> None:
        """Restore what the checkpoint holds; a technique switched on since starts fresh."""
        if self.mixer is not None and "mixer" in state:
            self.mixer.load_state_dict(state["mixer"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None and "swa" in state:
            self.swa.load_state_dict(state["swa"], optimizer)
        if self.early is not None and "early_stop" in state:
            self.early.load_state_dict(state["early_stop"])

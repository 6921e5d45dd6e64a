"""Pruning runs: fine-tuning through Kiln's Trainer, initial weights for rewinds, BatchNorm
re-estimation and the metadata that lets a pruned model be rebuilt from its file.

The pruning itself (masks, schedules, structured resizing) lives in :mod:`kiln.compress.prune.core`
and :mod:`kiln.compress.prune.structured`; this module connects it to run directories.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.compress.prune.core import Finetune

if TYPE_CHECKING:
    from kiln.config import Config
    from kiln.data.base import DataBundle, DataInfo

__all__ = ["initial_state", "kiln_metadata", "recalibrate_bn", "trainer_finetune"]


def kiln_metadata(cfg: Config, info: DataInfo) -> dict[str, str]:
    """The metadata :func:`kiln.train.checkpoint.weights.save_weights` writes (for rebuilding)."""
    from dataclasses import asdict

    from kiln.config import dump_config

    return {"kiln_config": dump_config(cfg), "kiln_data_info": json.dumps(asdict(info))}


def recalibrate_bn(model: nn.Module, loader: Iterable[Any]) -> bool:
    """Re-estimate BatchNorm running statistics over ``loader`` (``swa_utils.update_bn``).

    Pruning changes what reaches every BatchNorm after the pruned layers, so their running mean
    and variance are stale: on Kiln's digits ResNet, removing half of the inner block channels
    drops test accuracy to 14% with the old statistics and to 63% after one pass of
    recalibration, before any training. Returns False (and does nothing) without BatchNorm.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> recalibrate_bn(net, [(torch.randn(8, 3) + 5, None)])
        True
        >>> bool(net[1].running_mean.abs().sum() > 0)
        True
    """
    from torch.optim.swa_utils import update_bn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    was_training = model.training
    update_bn(loader, model)
    model.train(was_training)
    return True


def trainer_finetune(
    cfg: Config,
    data: DataBundle,
    *,
    epochs: int,
    out_dir: str | Path,
    overrides: list[str] | None = None,
) -> Finetune:
    """A :data:`Finetune` that trains with Kiln's Trainer and the run's config.

    Each cycle first re-estimates BatchNorm statistics on the train split
    (:func:`recalibrate_bn`), then is :func:`kiln.compress.finetune.finetune_in_run` in
    ``out_dir/cycle-<i>`` with ``train.epochs=epochs`` (no resume, ``max_steps`` and SWA off,
    ``overrides`` last): the masks stay, pruned weights get no gradient, and the best weights
    are read back. The Trainer's checkpoints and that run's ``model.safetensors`` hold
    ``weight_orig``/``weight_mask`` instead of ``weight``: they load into the masked model, not
    as a fresh one. The pruned folder's final file has plain keys.

    Returns:
        ``finetune(model, cycle)``, which leaves the model on the CPU in eval mode and returns
        ``{"pruned": test metrics before, "recalibrated": after the BatchNorm pass (models with
        BatchNorm only), "finetuned": test metrics after}`` (accuracy and loss, or MSE).

    Example:
        >>> tune = trainer_finetune(cfg, data, epochs=2, out_dir="out/ft")  # doctest: +SKIP
    """
    from kiln.compress.finetune import finetune_in_run
    from kiln.compress.report import score
    from kiln.config import apply_overrides, validate
    from kiln.train import build

    if epochs < 1:
        raise ValueError(f"fine-tuning needs >= 1 epoch, got {epochs}")
    fixed = [
        f"train.epochs={epochs}",
        "train.max_steps=null",
        "resume=null",
        "swa.enabled=false",
        "log.progress=false",
    ]
    raw = apply_overrides(cfg.model_dump(mode="json"), [*fixed, *(overrides or [])])
    tune_cfg = validate(raw)
    task = data.info.task
    assert data.train is not None
    train = build.loader_for(tune_cfg, data.train, train=False, device=torch.device("cpu"))
    test = None
    if data.test is not None and task in ("classification", "regression"):
        test = build.loader_for(tune_cfg, data.test, train=False, device=torch.device("cpu"))

    def finetune(model: nn.Module, cycle: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if test is not None:
            out["pruned"] = score(model.cpu().eval(), test, task)
        if recalibrate_bn(model.cpu(), train) and test is not None:
            out["recalibrated"] = score(model.eval(), test, task)
        finetune_in_run(tune_cfg, model, data, Path(out_dir) / f"cycle-{cycle}")
        if test is not None:
            out["finetuned"] = score(model, test, task)
        return out

    return finetune


def initial_state(
    run: str | Path, *, source: str = "init", trust_code: bool = False
) -> dict[str, torch.Tensor]:
    """The weights a run started from, for lottery-ticket rewinding.

    Args:
        run: the run directory.
        source: ``init`` rebuilds the model exactly as the Trainer did before step 1 (seed ->
            data -> model, from the run's ``config.yaml``; this reseeds the global RNGs);
            ``earliest`` reads the model from the run's earliest kept checkpoint (late
            rewinding; the Trainer keeps the last N checkpoints, so it may be a late one).
        trust_code: allow the config's ``model.target`` import path (see :mod:`kiln.trust`).

    Raises:
        ValueError: an unknown ``source``, or an FSDP-sharded checkpoint.
        FileNotFoundError: no config, or (``earliest``) no checkpoint.

    Example:
        >>> start = initial_state("runs/digits")        # doctest: +SKIP
    """
    from kiln.run import CHECKPOINTS, CONFIG, checkpoint_files, read_config

    run_dir = Path(run)
    cfg = read_config(run_dir)
    if source == "init":
        from kiln.train import build
        from kiln.train.reproducibility import seed_everything
        from kiln.trust import refuse_file_target

        refuse_file_target(cfg.model.target, run_dir / CONFIG, trust_code=trust_code)
        seed_everything(cfg.seed)
        data = build.build_data_for(cfg)
        model = build.build_model_for(cfg, data.info)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    if source == "earliest":
        from kiln.train.checkpoint import load_checkpoint

        ckpts = checkpoint_files(run_dir)
        if not ckpts:
            raise FileNotFoundError(f"no step-*.ckpt in {run_dir / CHECKPOINTS}")
        saved = load_checkpoint(ckpts[0])
        if "sharded" in saved:
            raise ValueError(f"{ckpts[0]} is sharded; `kiln consolidate` it first")
        return dict(saved["model"])
    raise ValueError(f"unknown rewind source {source!r}; allowed: init, earliest")

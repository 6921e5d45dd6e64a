"""From a validated Config to live objects: data, loaders, model, run directory.

Kept apart from the Trainer so ``kiln eval`` and the other verbs rebuild exactly what training
used (same seeded split, same model) from a run directory's ``config.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kiln.config import Config, dump_config
from kiln.data.base import DataBundle, DataInfo
from kiln.data.loader import ArrayLoader, make_loader
from kiln.train.engine import Engine

Loader = DataLoader[Any] | ArrayLoader

_IMAGE_MODELS = {"resnet"}


def engine_for(cfg: Config) -> Engine:
    """The Engine a config describes (joins the process group under ddp/fsdp)."""
    return Engine(
        device=cfg.device,
        precision=cfg.precision,
        accumulate=cfg.train.accumulate,
        clip_norm=cfg.train.clip_norm,
        clip_value=cfg.train.clip_value,
        compile=cfg.compile,
        channels_last=cfg.channels_last,
        allow_fp16_cpu=cfg.allow_fp16_cpu,
        strategy=cfg.strategy,
        sync_batchnorm=cfg.sync_batchnorm,
    )


def resolve_layout(cfg: Config) -> str:
    """``data.layout=auto`` -> ``image`` for convolutional models, else ``flat``."""
    if cfg.data.layout != "auto":
        return cfg.data.layout
    if cfg.model.target is None and cfg.model.name in _IMAGE_MODELS:
        return "image"
    return "flat"


def build_data_for(cfg: Config) -> DataBundle:
    """The data bundle a config describes (seeded split, train-only normalisation)."""
    from kiln.data import build_data

    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.seed
    return build_data(cfg.data, seed=seed, layout=resolve_layout(cfg), sample_seed=cfg.seed)


def build_model_for(cfg: Config, info: DataInfo) -> nn.Module:
    """The model a config describes, sized from the data."""
    from kiln.registry import build_model
    from kiln.train.model_memory import check_model_fits

    model_cfg = cfg.model
    if model_cfg.drop_path > 0:
        if "drop_path" in model_cfg.kwargs:
            raise ValueError(
                "set stochastic depth once: model.drop_path or model.kwargs.drop_path, not both"
            )
        kwargs = {**model_cfg.kwargs, "drop_path": model_cfg.drop_path}
        model_cfg = model_cfg.model_copy(update={"kwargs": kwargs})
    check_model_fits(model_cfg, info)  # shapes on the meta device, before any allocation
    model = build_model(model_cfg, info)
    if model_cfg.init != "default" or model_cfg.zero_init_last:
        from kiln.models.init import init_weights

        init_weights(
            model,
            model_cfg.init,
            std=model_cfg.init_std,
            zero_init_last=model_cfg.zero_init_last,
        )
    if model_cfg.pretrained:
        load_pretrained_for(model, model_cfg)
    return model


def load_pretrained_for(model: nn.Module, model_cfg: Any) -> None:
    """Load ``model.pretrained`` into ``model``, leaving out ``pretrained_exclude`` keys.

    With ``pretrained_strict`` every model key not excluded must load with its shape; the
    excluded ones (a new head) keep their fresh initialisation.

    Raises:
        ValueError: the load report, when strict loading finds missing/unexpected/mismatched keys.
    """
    from fnmatch import fnmatchcase

    from kiln.models.pretrained import load_pretrained, read_state_dict

    pats = model_cfg.pretrained_exclude
    state = read_state_dict(model_cfg.pretrained)
    state = {k: v for k, v in state.items() if not any(fnmatchcase(k, p) for p in pats)}
    report = load_pretrained(model, state, strict=False, origin=str(model_cfg.pretrained))
    missing = [k for k in report.missing if not any(fnmatchcase(k, p) for p in pats)]
    if model_cfg.pretrained_strict and (missing or report.unexpected or report.mismatched):
        raise ValueError(
            f"model.pretrained={model_cfg.pretrained} does not fit this model:\n{report}\n"
            "exclude keys with model.pretrained_exclude=['fc.*'], or set "
            "model.pretrained_strict=false to load what matches"
        )


def class_counts(dataset: Any, num_classes: int) -> torch.Tensor:
    """Examples per class in ``dataset`` (for ``loss.class_weights=auto``).

    Reads the label tensor directly for in-memory datasets (and ``Subset`` s of them), else
    iterates the dataset once.
    """

    base, indices = dataset, None
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch Subset
        base, indices = dataset.dataset, list(dataset.indices)
    labels = getattr(base, "y", None)
    if isinstance(labels, torch.Tensor):
        y = labels if indices is None else labels[indices]
    else:
        y = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return torch.bincount(y.long().flatten(), minlength=num_classes)[:num_classes]


def loss_for(cfg: Config, data: DataBundle) -> Any:
    """The training loss a config describes (``class_weights=auto`` counts the train split)."""
    from kiln.losses import MultiTaskCriterion, build_loss

    counts = None
    info = data.info
    if info.task == "multitask":
        from kiln.data.multitask import task_columns

        if cfg.loss.name != "auto" or cfg.loss.class_weights is not None:
            raise ValueError(
                "multi-task data uses cross-entropy / MSE per task combined by learned or fixed "
                "task weights; leave loss.name=auto and loss.class_weights unset (set "
                "loss.task_weights for fixed weights)"
            )
        return MultiTaskCriterion(
            task_columns(info),
            weights=cfg.loss.task_weights,
            label_smoothing=cfg.loss.label_smoothing,
        )
    if cfg.loss.task_weights is not None:
        raise ValueError(
            f"loss.task_weights is for multi-task data; this data is {info.task}: remove it"
        )
    if cfg.loss.class_weights == "auto" and info.num_classes and data.train is not None:
        counts = class_counts(data.train, info.num_classes)
    return build_loss(cfg.loss, task=info.task, class_counts=counts)


def add_loss_parameters(
    optimizer: torch.optim.Optimizer, loss_fn: Any, device: torch.device, world: int
) -> None:
    """Train a loss's own parameters (multi-task log-variances) with the model.

    They go to ``device`` and into one extra optimizer group named ``loss``, with weight decay
    off (decay would pull every log-variance to 0, i.e. equal task weights) and the base LR.
    Added before the LR scheduler is built, so the schedule covers them too.

    Raises:
        ValueError: under several processes (each rank's loss would learn its own weights).
    """
    if not isinstance(loss_fn, torch.nn.Module):
        return
    loss_fn.to(device)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    if not params:
        return
    if world > 1:
        raise ValueError(
            "learned multi-task weights are not yet supported with several processes; set "
            "loss.task_weights={task: weight, ...} for fixed weights, or train on one process"
        )
    optimizer.add_param_group(
        {"params": params, "weight_decay": 0.0, "name": "loss", "lr_mult": 1.0}
    )


def per_rank_batch(cfg: Config, world: int) -> int:
    """``data.batch_size`` is the global batch; each of ``world`` ranks takes an equal share."""
    if cfg.data.batch_size % world:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} (the global batch) does not divide over "
            f"{world} processes; use a multiple of {world}, e.g. "
            f"data.batch_size={cfg.data.batch_size // world * world or world}"
        )
    return cfg.data.batch_size // world


def loader_for(
    cfg: Config,
    dataset: Dataset[Any],
    *,
    train: bool,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> Loader:
    """A train (shuffled, seeded, padded shards) or eval (in order, uneven shards) loader.

    Under several processes each rank loads its shard: ``world`` ranks of ``batch_size / world``
    make the configured global batch.
    """
    d = cfg.data
    pin = d.pin_memory if isinstance(d.pin_memory, bool) else device.type == "cuda"
    eval_bs = d.eval_batch_size or d.batch_size
    return make_loader(
        dataset,
        batch_size=per_rank_batch(cfg, world) if train else max(1, eval_bs // world),
        rank=rank,
        world=world,
        pad=train,
        shuffle=train,
        seed=cfg.seed,
        drop_last=d.drop_last if train else False,
        num_workers=d.num_workers,
        persistent_workers=d.persistent_workers,
        pin_memory=pin and device.type == "cuda",
    )


def loaders_for(
    cfg: Config, data: DataBundle, *, device: torch.device, rank: int, world: int, fsdp: bool
) -> tuple[Loader, Loader | None, Loader | None]:
    """The train loader (this rank's shard), and the val and test loaders (None when empty).

    Validation shards over the ranks only when they can evaluate independently (FSDP2's forward
    is a collective, so every rank then sees all of it); test runs on every rank in full.
    """
    shard = {"rank": rank, "world": world}
    train = loader_for(cfg, data.train, train=True, device=device, **shard)
    val_shard = {} if fsdp else shard
    val = loader_for(cfg, data.val, train=False, device=device, **val_shard) if data.val else None
    test = loader_for(cfg, data.test, train=False, device=device) if data.test else None
    return train, val, test


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name``, or ``name-1``, ``name-2``... when it exists: never overwrite a run."""
    base = Path(out_dir)
    candidate = base / name
    i = 0
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base / f"{name}-{i}"
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def write_run_files(run_dir: Path, cfg: Config, info: DataInfo) -> None:
    """The resolved config and the data description, for the other verbs."""
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "data_info.json").write_text(json.dumps(asdict(info), indent=1))


def read_data_info(run_dir: Path) -> DataInfo:
    raw = json.loads((run_dir / "data_info.json").read_text())
    raw["input_shape"] = tuple(raw["input_shape"])
    return DataInfo(**raw)

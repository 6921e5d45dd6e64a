"""From a validated Config to live objects: data, loaders, model, run directory, and the
:class:`Parts` of a fit.

Kept apart from the Trainer so ``kiln eval`` and the other verbs rebuild exactly what training
used (same seeded split, same model) from a run directory's ``config.yaml``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kiln.config import Config
from kiln.data.base import DataBundle, DataInfo
from kiln.data.loader import ArrayLoader, batch_sizes, make_loader
from kiln.train.accumulation import updates_per_pass
from kiln.train.engine import Engine
from kiln.train.evaluation import monitor_mode
from kiln.train.metrics import build_metrics
from kiln.train.optim import build_optimizer, build_scheduler
from kiln.train.reproducibility import seed_everything, set_deterministic
from kiln.train.techniques import Techniques, check_techniques

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


@dataclass
class Parts:
    """The live objects of one fit, built once by :func:`build_parts` (none of them is saved
    here: each part's own ``state_dict`` is, see ``kiln.train.snapshots``).

    Attributes:
        engine: device, precision, accumulation, the update.
        data: the data bundle (splits and what the data says).
        model: the model as wrapped by ``engine.setup`` (DDP/compile); ``engine.model`` is the
            unwrapped one.
        template: a plain copy of the model before FSDP2 sharded it (else the model itself).
        optimizer, scheduler, loss_fn: what the update uses (scheduler None when off).
        tech: the techniques switched on (mixing, EMA, SWA, freezing, early stopping).
        metrics: the validation metrics.
        train_loader, val_loader, test_loader: this rank's loaders (val/test None when empty).
        n_batches: loader batches per epoch; per_rank_batch: examples in each.
        updates_per_epoch, total_steps: the run's length in updates.
        monitor, mode: the metric that picks the best checkpoint, and ``min``/``max``.
        early_monitor: the metric early stopping watches (None when off).
    """

    engine: Engine
    data: DataBundle
    model: nn.Module
    template: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Any
    tech: Techniques
    metrics: Any
    train_loader: Loader
    val_loader: Loader | None
    test_loader: Loader | None
    n_batches: int
    per_rank_batch: int
    updates_per_epoch: int
    total_steps: int
    monitor: str
    mode: str
    early_monitor: str | None = None


def build_parts(cfg: Config, model: nn.Module | None, data: DataBundle | None) -> Parts:
    """Seed, then build data -> model -> Engine.setup -> optimizer -> loaders -> scheduler.

    The order is the one every run has always used (the seeded initial weights depend on it).
    Joins the process group under ddp/fsdp (the Engine does).

    Example:
        >>> from kiln.config import load_config
        >>> cfg = load_config(None, ["model.kwargs.hidden=[8]"])
        >>> parts = build_parts(cfg, None, None)  # doctest: +SKIP
        >>> parts.n_batches > 0                   # doctest: +SKIP
        True
    """
    seed_everything(cfg.seed)
    set_deterministic(cfg.deterministic)
    data = data if data is not None else build_data_for(cfg)
    info = data.info
    engine = engine_for(cfg)
    world = engine.world
    check_techniques(cfg, info, strategy=engine.strategy, world=world.size)
    model = model if model is not None else build_model_for(cfg, info)
    if cfg.train.activation_checkpointing:
        from kiln.algorithms.activation_checkpointing import apply_activation_checkpointing

        targets = cfg.train.activation_checkpointing
        apply_activation_checkpointing(model, None if targets is True else targets)
    tech = Techniques(cfg, info, model, epochs=cfg.train.epochs, rank=world.rank)
    freezer = tech.freezer
    if freezer is not None and not freezer.dynamic:
        freezer.apply(model, epoch=0)  # before wrapping and the optimizer: both skip them
    # FSDP2 shards the model in place; a plain copy rebuilds the best weights at the end.
    template = copy.deepcopy(model) if engine.strategy == "fsdp" else model
    wrapped, _ = engine.setup(model)
    optimizer = build_optimizer(engine.model, cfg.optim)  # type: ignore[arg-type]
    loss_fn = loss_for(cfg, data)
    add_loss_parameters(optimizer, loss_fn, engine.device, world.size)
    if freezer is not None and freezer.dynamic:
        # Unfrozen later, so they stay in the optimizer; with no grad they get no update.
        freezer.apply(model, epoch=0)
    dev = engine.device
    train, val, test = loaders_for(
        cfg, data, device=dev, rank=world.rank, world=world.size, fsdp=engine.strategy == "fsdp"
    )
    per_rank = per_rank_batch(cfg, world.size)
    sizes = batch_sizes(len(train.sampler), per_rank, cfg.data.drop_last)  # type: ignore[arg-type]
    if not sizes:
        raise ValueError(
            f"the train split has {len(data.train)} examples, fewer than one batch of "  # type: ignore[arg-type]
            f"{cfg.data.batch_size} with drop_last; lower data.batch_size"
        )
    updates_per_epoch = updates_per_pass(len(sizes), cfg.train.accumulate)
    total_steps = cfg.train.max_steps or updates_per_epoch * cfg.train.epochs
    scheduler = build_scheduler(
        optimizer,
        cfg.scheduler,
        steps_per_epoch=updates_per_epoch,
        epochs=cfg.train.epochs,
        total_steps=total_steps,
    )
    metrics = build_metrics(info, device=dev, top_k=cfg.train.top_k, sync=world.size > 1)
    monitor = cfg.checkpoint.monitor
    if val is None and monitor.startswith("val/"):
        monitor = "train/" + monitor.split("/", 1)[1]
    early_monitor = _early_stopping(cfg, tech, monitor, has_val=val is not None)
    return Parts(
        engine=engine,
        data=data,
        model=wrapped,
        template=template,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        tech=tech,
        metrics=metrics,
        train_loader=train,
        val_loader=val,
        test_loader=test,
        n_batches=len(sizes),
        per_rank_batch=per_rank,
        updates_per_epoch=updates_per_epoch,
        total_steps=total_steps,
        monitor=monitor,
        mode=monitor_mode(monitor, cfg.checkpoint.mode),
        early_monitor=early_monitor,
    )


def _early_stopping(cfg: Config, tech: Techniques, monitor: str, *, has_val: bool) -> str | None:
    """Put early stopping into ``tech`` when it is on; the metric it watches."""
    from kiln.algorithms.early_stopping import EarlyStopping

    es = cfg.early_stop
    if not es.enabled:
        return None
    early_monitor = es.monitor or monitor
    if not early_monitor.startswith("val/") or not has_val:
        raise ValueError(
            f"early_stop monitors a validation metric (got {early_monitor!r}); "
            "set data.val_fraction > 0 and early_stop.monitor=val/<metric>"
        )
    tech.early = EarlyStopping(
        mode=monitor_mode(early_monitor, es.mode), patience=es.patience, min_delta=es.min_delta
    )
    return early_monitor

"""Optimizers and their parameter groups: weight decay where it helps, an LR per module.

Why groups: weight decay on biases and normalisation scales/shifts only pulls them toward zero
(they do not grow the function's capacity the way weight matrices do), so the standard recipe
(BERT, nanoGPT, timm) exempts them; fine-tuning wants a smaller LR for a pretrained backbone than
for a fresh head. :func:`param_groups` builds both from an :class:`~kiln.config.OptimConfig` as a
few groups keyed by (decay, LR multiplier); :func:`build_optimizer` turns them into a torch
optimizer. Each group keeps its own ``lr``, so every torch scheduler and the ones from
:func:`build_scheduler` (re-exported from :mod:`kiln.train.schedules`) scale it per group.

Example:
    >>> import torch.nn as nn
    >>> from kiln.config import OptimConfig
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    >>> [(g["name"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    [('decay', 0.05, 2), ('no_decay', 0.0, 4)]
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from kiln.config import OptimConfig
from kiln.train.schedules import Interval, Schedule, build_scheduler

__all__ = ["Interval", "Schedule", "build_optimizer", "build_scheduler", "param_groups"]

# _NormBase covers BatchNorm*, SyncBatchNorm, InstanceNorm* and their Lazy variants.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

# Devices with fused optimizer kernels in every torch we support (>= 2.9).
_FUSED_DEVICES = {"cpu", "cuda"}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer groups.

    A parameter gets no weight decay (when ``cfg.no_decay_bias_norm``) if it belongs to a
    normalisation layer (BatchNorm*, LayerNorm, GroupNorm, InstanceNorm*, RMSNorm), is named
    ``bias``, or has fewer than 2 dimensions; all other weights (linear, conv, embedding) decay
    with ``cfg.weight_decay``. ``cfg.lr_mult`` maps ``fnmatch`` globs on names from
    ``model.named_parameters()`` (``*`` also crosses dots: ``"backbone.*"``) to LR multipliers;
    the **first** pattern in the mapping that matches any of a parameter's names wins, and
    unmatched parameters keep multiplier 1. Frozen parameters (``requires_grad=False``) are
    left out; a tied parameter appears once.

    Args:
        model: The network; the groups hold references to its parameters.
        cfg: Decay, LR and the per-name LR multipliers.

    Returns:
        One dict per (decay, multiplier) pair in order of first appearance, with ``params``,
        ``lr`` (``cfg.lr * mult``), ``weight_decay``, ``lr_mult`` and a ``name`` for logging
        (``"decay"``, ``"no_decay"``, ``"decay x0.1"``, ...).

    Raises:
        ValueError: No trainable parameter, a lazy module not yet run, a negative multiplier,
            or an ``lr_mult`` pattern that matches no parameter name (a typo must not be silent).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> groups = param_groups(model, OptimConfig(lr=0.1, lr_mult={"1.*": 0.5}))
        >>> [(g["name"], g["lr"]) for g in groups]
        [('decay', 0.1), ('no_decay', 0.1), ('decay x0.5', 0.05), ('no_decay x0.5', 0.05)]
    """
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters()
    }
    # Every name of every parameter (tied ones have several), in registration order.
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), (p, []))[1].append(name)
    all_names = [n for _, ns in names.values() for n in ns]
    _check_patterns(cfg.lr_mult, all_names)

    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for p, ns in names.values():
        if not p.requires_grad:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter {ns[0]!r} belongs to a lazy module that has not run yet; call the "
                "model once on a sample batch before building the optimizer"
            )
        exempt = id(p) in norm_ids or p.ndim < 2 or any(n.rsplit(".", 1)[-1] == "bias" for n in ns)
        # With no weight decay at all the split changes nothing: one group, one fused kernel call.
        decay = cfg.weight_decay == 0.0 or not (cfg.no_decay_bias_norm and exempt)
        mult = next(
            (m for pat, m in cfg.lr_mult.items() if any(fnmatchcase(n, pat) for n in ns)), 1.0
        )
        if (decay, mult) not in groups:
            kind = "all" if cfg.weight_decay == 0.0 else "decay" if decay else "no_decay"
            label = kind + ("" if mult == 1.0 else f" x{mult:g}")
            groups[decay, mult] = {
                "params": [],
                "lr": cfg.lr * mult,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_mult": mult,
                "name": label,
            }
        groups[decay, mult]["params"].append(p)
    if not groups:
        raise ValueError(
            f"all parameters of {type(model).__name__} are frozen (requires_grad=False) or it "
            "has none; unfreeze the ones to train (p.requires_grad_(True)) before building "
            "the optimizer"
        )
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg`` over :func:`param_groups` of ``model``.

    ``sgd`` uses ``momentum``/``nesterov``; ``adam`` and ``adamw`` use ``betas``/``eps``
    (``adam`` adds weight decay to the gradient as an L2 term, ``adamw`` decouples it).
    When every parameter is a plain CPU or CUDA floating tensor the fused kernels are used
    (a few kernels for all parameters; on this project's CPU, one thread, the optimizer step
    of AdamW took 3-6x less time than torch's CPU default, a Python loop over parameters, and
    SGD 1.4-4x less); otherwise torch picks its default (foreach on accelerators).

    Args:
        model: The network, already on its device (or moved later by ``Module.to``).
        cfg: Optimizer name and hyper-parameters.

    Returns:
        A ``torch.optim.SGD``, ``Adam`` or ``AdamW`` whose groups carry ``name`` and ``lr_mult``.

    Raises:
        ValueError: ``nesterov`` without momentum or with Adam, or no trainable parameter.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, nesterov=True))
        >>> type(opt).__name__, opt.defaults["nesterov"]
        ('SGD', True)
    """
    if cfg.nesterov and cfg.name != "sgd":
        raise ValueError(
            f"optim.nesterov=true applies to sgd only (optim.name={cfg.name}); "
            "set optim.nesterov=false or optim.name=sgd"
        )
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError(
            "optim.nesterov=true needs optim.momentum > 0 (got 0); set optim.momentum=0.9 "
            "or optim.nesterov=false"
        )
    if cfg.layer_decay is not None:
        from kiln.models.pretrained import layerwise_lr_decay

        merged = dict(cfg.lr_mult)  # the user's own patterns match first
        for pattern, mult in layerwise_lr_decay(model, cfg.layer_decay).items():
            merged.setdefault(pattern, mult)
        cfg = cfg.model_copy(update={"lr_mult": merged, "layer_decay": None})
    groups = param_groups(model, cfg)
    impl = _impl([p for g in groups for p in g["params"]])
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            **impl,
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl
    )


def _impl(params: list[torch.Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when the fused kernels take every parameter, else torch's default."""
    devices = {p.device.type for p in params}
    plain = all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point() for p in params)
    return {"fused": True} if plain and len(devices) == 1 and devices <= _FUSED_DEVICES else {}


def _check_patterns(lr_mult: dict[str, float], all_names: list[str]) -> None:
    for pattern, mult in lr_mult.items():
        if not (math.isfinite(mult) and mult >= 0):
            raise ValueError(
                f"optim.lr_mult[{pattern!r}]={mult} must be a finite number >= 0 (0 freezes "
                "the LR at zero; prefer requires_grad_(False) to freeze)"
            )
        if not any(fnmatchcase(n, pattern) for n in all_names):
            prefixes = sorted({n.split(".", 1)[0] + ".*" for n in all_names})
            raise ValueError(
                f"optim.lr_mult pattern {pattern!r} matches no parameter name; names look like "
                f"{', '.join(all_names[:4])}{', ...' if len(all_names) > 4 else ''} "
                f"(top-level patterns: {', '.join(prefixes[:8])}); patterns are "
                "case-sensitive fnmatch globs on model.named_parameters() names"
            )

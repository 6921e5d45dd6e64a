"""Model + optimizer state for checkpoints, the same way for one process, DDP and FSDP2.

Non-sharded runs save full state dicts keyed by parameter name (``get_state_dict`` with
``full_state_dict=True``), so a checkpoint written by any world size loads into any other. FSDP2
runs save sharded with ``torch.distributed.checkpoint`` (every rank writes its shard into
``step-N.dcp/``) and the rest of the state in ``step-N.ckpt``; DCP reshards on load, so 2 ranks
can resume on 1 process and back. :func:`consolidate` turns a sharded checkpoint into one full
state dict (for ``model.safetensors``) in a single process.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> msd, osd = full_state(m, opt)
    >>> sorted(msd)
    ['bias', 'weight']
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _options(full: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], Any]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name.

    Under FSDP2 this is a collective: every rank must call it; rank 0 gets the tensors.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(True))


_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _keep_impl(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: g[k] for k in _IMPL_KEYS if k in g} for g in optimizer.param_groups]


def _restore_impl(optimizer: torch.optim.Optimizer, impl: list[dict[str, Any]]) -> None:
    # A checkpoint carries the writer's kernel choice (fused for plain CPU tensors); the loader's
    # parameters may not take it (FSDP2's DTensors have no fused kernel), so keep our own.
    for g, flags in zip(optimizer.param_groups, impl, strict=True):
        g.update(flags)


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, msd: dict[str, Any], osd: Any
) -> None:
    """Load full state dicts (from any world size) into ``model``/``optimizer`` (sharding them)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    _check_shapes(model, msd)
    if optimizer is None:
        set_model_state_dict(model, msd, options=_options(True))
        return
    impl = _keep_impl(optimizer)
    saved_groups = osd.get("param_groups", []) if isinstance(osd, dict) else []
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=False):
        # Keys a schedule added during the run (SWALR's swa_lr) must exist before loading.
        for key, value in saved.items():
            if key not in group and key != "params":
                group[key] = value
    set_state_dict(
        model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options(True)
    )
    _restore_impl(optimizer, impl)


def _check_shapes(model: nn.Module, msd: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another architecture with the keys that differ."""
    from kiln.train.checkpoint import CheckpointError

    # a DTensor's .shape is the full (global) shape, so this also holds under FSDP2
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if hasattr(v, "shape")}
    saved = {k: tuple(v.shape) for k, v in msd.items() if hasattr(v, "shape")}
    missing = sorted(own.keys() - saved.keys())
    unexpected = sorted(saved.keys() - own.keys())
    mismatched = [
        f"{k} {saved[k]} vs {own[k]}" for k in own.keys() & saved.keys() if saved[k] != own[k]
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape (saved vs model)", mismatched),
            )
            if items
        ]
        raise CheckpointError(
            "the checkpoint was written for a different model (" + "; ".join(parts) + "); "
            "resume with the run's own model settings (drop model.* overrides)"
        )


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shard of model and optimizer state into ``directory`` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(False))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))


def load_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path
) -> None:
    """Load a DCP checkpoint into ``model``/``optimizer`` with this run's sharding (any world)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if not directory.is_dir():
        from kiln.train.checkpoint import CheckpointError

        raise CheckpointError(f"sharded checkpoint folder missing: {directory}")
    if optimizer is None:
        msd = get_model_state_dict(model, options=_options(False))
        _dcp_load(dcp, {"model": msd}, directory)
        set_model_state_dict(model, msd, options=_options(False))
        return
    impl = _keep_impl(optimizer)
    msd, osd = get_state_dict(model, optimizer, options=_options(False))
    state: dict[str, Any] = {"model": msd, "optim": osd}
    _dcp_load(dcp, state, directory)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(False),
    )
    _restore_impl(optimizer, impl)


def _dcp_load(dcp: Any, state: dict[str, Any], directory: Path) -> None:
    with warnings.catch_warnings():
        # Loading a sharded checkpoint in one process is intended (resume on fewer ranks).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        dcp.load(state, checkpoint_id=str(directory))


def consolidate(model: nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, loaded into ``model`` in one process."""
    load_sharded(model, None, directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

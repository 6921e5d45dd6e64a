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

import contextlib
import warnings
from collections.abc import Iterator
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
    from kiln.train.checkpoint.schema import CheckpointError

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
        from kiln.train.checkpoint.schema import CheckpointError

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
    from kiln.safeio.dcp import safe_reader

    with warnings.catch_warnings():
        # Loading a sharded checkpoint in one process is intended (resume on fewer ranks).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        # Kiln's reader: DCP's own would pickle.load the folder's .metadata unchecked.
        dcp.load(state, storage_reader=safe_reader(directory))


def consolidate(model: nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, loaded into ``model`` in one process."""
    load_sharded(model, None, directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def outside_model(optimizer: torch.optim.Optimizer) -> Iterator[list[dict[str, Any]]]:
    """Hide the groups whose parameters the model does not own (``name == "loss"``).

    ``get_state_dict`` keys optimizer state by the model's parameter names, so a group of a
    loss's own parameters (learned multi-task weights) has no name there. Inside this context
    those groups are out of ``optimizer.param_groups``; :func:`outside_state` and
    :func:`load_outside_state` save and restore them by position instead.
    """
    extra = [g for g in optimizer.param_groups if g.get("name") == "loss"]
    if not extra:
        yield []
        return
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g.get("name") != "loss"]
    hidden = {p: optimizer.state.pop(p) for g in extra for p in g["params"] if p in optimizer.state}
    try:
        yield extra
    finally:
        optimizer.param_groups.extend(extra)
        for p, st in hidden.items():
            optimizer.state.setdefault(p, st)  # a restore inside the context may set new state


def outside_state(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> list[Any]:
    """Hyper-parameters and per-parameter state of ``groups`` (CPU copies), in order."""
    out: list[Any] = []
    for g in groups:
        states = [
            {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in st.items()}
            for st in (optimizer.state.get(p, {}) for p in g["params"])
        ]
        hyper = {k: v for k, v in g.items() if k != "params" and k not in _IMPL_KEYS}
        out.append({"hyper": hyper, "state": states})
    return out


def load_outside_state(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], saved: list[Any]
) -> None:
    """Restore what :func:`outside_state` saved into the same groups (same order and sizes)."""
    if len(saved) != len(groups):
        raise ValueError(
            f"the checkpoint has {len(saved)} loss parameter group(s), this run has "
            f"{len(groups)}; resume with the same loss settings"
        )
    for g, s in zip(groups, saved, strict=True):
        g.update(s["hyper"])
        for p, st in zip(g["params"], s["state"], strict=True):
            if st:
                optimizer.state[p] = {
                    k: v.to(p.device) if torch.is_tensor(v) else v for k, v in st.items()
                }

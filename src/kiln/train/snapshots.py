"""What the Trainer saves and restores, for one process, DDP and FSDP2 alike.

* :func:`capture`: the full state dict of a run (DESIGN.md rule 5). Model and optimizer are full
  state dicts keyed by parameter name, except under FSDP2, where every rank writes its shard to
  ``step-N.dcp/`` and the dict names that folder. RNG states of every rank are kept (rank order),
  so each rank resumes its own dropout stream.
* :func:`restore`: the inverse, from a checkpoint written by any world size.
* :func:`best_weights`: a plain (unsharded, unwrapped) copy of the best model, on rank 0.

Collectives: under several processes every rank must call these functions together. Each
function takes the parts it reads (:class:`~kiln.train.build.Parts`) and the loop's
:class:`~kiln.train.loop_state.LoopState`; :func:`restore` loads into the parts' objects and
returns the restored loop state instead of setting it anywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from kiln.config import Config
from kiln.train import distributed
from kiln.train.build import Parts
from kiln.train.checkpoint import RESUME_KEYS, load_checkpoint
from kiln.train.checkpoint import state as ckpt_state
from kiln.train.engine import Engine
from kiln.train.loop_state import LoopState
from kiln.train.reproducibility import rng_state, set_rng_state

__all__ = ["best_weights", "capture", "restore", "sharded"]


def sharded(engine: Engine) -> bool:
    """Whether the model is sharded over the ranks (FSDP2): each rank saves its own shard."""
    return engine.strategy == "fsdp"


def capture(parts: Parts, state: LoopState, cfg: Config, directory: Path) -> dict[str, Any]:
    """The run's state at ``state.step`` (writes the shard folder into ``directory`` first under
    FSDP2)."""
    engine, optimizer, loss_fn = parts.engine, parts.optimizer, parts.loss_fn
    model = engine.model
    assert model is not None
    out: dict[str, Any] = {
        "scheduler": parts.scheduler.state_dict() if parts.scheduler else None,
        "engine": engine.state_dict(),
        "rng": distributed.all_gather_object(rng_state()),
        "loop": state.state_dict(),
        "techniques": parts.tech.state_dict(),
        # A loss with parameters (learned multi-task weights) trains with the model.
        "loss": loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else None,
        "best": dict(state.best),
        "world_size": engine.world.size,
        "config": cfg.model_dump(mode="json"),
        # Where earlier processes of this run resumed (outside "loop": it is history, not state).
        "resumed_from": list(state.resumed_from),
    }
    with ckpt_state.outside_model(optimizer) as extra:
        if sharded(engine):
            folder = f"step-{state.step}.dcp"
            ckpt_state.save_sharded(model, optimizer, directory / folder)
            out["sharded"] = folder
        else:
            out["model"], out["optimizer"] = ckpt_state.full_state(model, optimizer)
    if extra:
        out["loss_optimizer"] = ckpt_state.outside_state(optimizer, extra)
    return out


def restore(parts: Parts, path: Path) -> tuple[LoopState, dict[str, Any]]:
    """Load a checkpoint file (and its shard folder, if any) into the parts' objects.

    Returns:
        The loop state the checkpoint holds (``resumed_from`` left empty: the caller decides
        whether this is a resume or a rollback), and the file's dict (its ``loop`` counters and
        ``resumed_from`` history, for the caller's bookkeeping).
    """
    saved = load_checkpoint(path, map_location="cpu", require=RESUME_KEYS)
    engine, optimizer, tech, loss_fn = parts.engine, parts.optimizer, parts.tech, parts.loss_fn
    model = engine.model
    assert model is not None
    if tech.freezer is not None:
        # The trained set at the saved epoch, before the optimizer state (which covers exactly
        # the parameters that had gradients then) is loaded.
        tech.freezer.apply(model, saved["loop"]["epoch"])
    with ckpt_state.outside_model(optimizer) as extra:
        if "sharded" in saved:
            ckpt_state.load_sharded(model, optimizer, path.parent / saved["sharded"])
        else:
            ckpt_state.load_full_state(model, optimizer, saved["model"], saved["optimizer"])
    if extra:
        ckpt_state.load_outside_state(optimizer, extra, saved.get("loss_optimizer", []))
    if parts.scheduler and saved.get("scheduler"):
        parts.scheduler.load_state_dict(saved["scheduler"])
    engine.load_state_dict(saved["engine"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    # Same world size: each rank continues its own RNG stream; otherwise rank 0's is reused.
    set_rng_state(rngs[engine.world.rank] if len(rngs) == engine.world.size else rngs[0])
    loop = LoopState.from_state(saved["loop"], best=saved.get("best", {}))
    tech.load_state_dict(saved.get("techniques", {}), optimizer)
    if isinstance(loss_fn, nn.Module) and saved.get("loss") is not None:
        loss_fn.load_state_dict(saved["loss"])
    return loop, saved


def best_weights(parts: Parts, best_file: Path | None, *, ema: bool) -> nn.Module | None:
    """A plain copy of the model with the best checkpoint's weights (rank 0; None elsewhere).

    Args:
        parts: the fit's parts (the model, and its unsharded template under FSDP2).
        best_file: the best checkpoint, or None for the model as it is.
        ema: use the checkpoint's EMA weights when it has them (``ema.evaluate``).
    """
    engine = parts.engine
    model = engine.model
    assert model is not None
    if sharded(engine):
        if best_file is not None:  # every rank loads its shard of the best, then gathers
            best_state = load_checkpoint(best_file, map_location="cpu")
            ckpt_state.load_sharded(model, None, best_file.parent / best_state["sharded"])
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=ckpt_state._options(True))
        if not engine.world.is_zero:
            return None
        plain = copy.deepcopy(parts.template)
        plain.load_state_dict(full)
        return plain.to(engine.device)
    if not engine.world.is_zero:
        return None
    plain = copy.deepcopy(model)
    if best_file is not None:
        saved = load_checkpoint(best_file, map_location=engine.device)
        plain.load_state_dict(saved["model"])
        ema_state = saved.get("techniques", {}).get("ema")
        if ema_state is not None and ema:
            from kiln.algorithms.ema import EMA  # the best checkpoint's EMA weights

            shadow = EMA(plain)
            shadow.load_state_dict(ema_state)
            shadow.copy_to(plain)
    return plain

"""What the Trainer saves and restores, for one process, DDP and FSDP2 alike.

* :func:`capture`: the full state dict of a run (DESIGN.md rule 5). Model and optimizer are full
  state dicts keyed by parameter name, except under FSDP2, where every rank writes its shard to
  ``step-N.dcp/`` and the dict names that folder. RNG states of every rank are kept (rank order),
  so each rank resumes its own dropout stream.
* :func:`restore`: the inverse, from a checkpoint written by any world size.
* :func:`best_weights`: a plain (unsharded, unwrapped) copy of the best model, on rank 0.

Collectives: under several processes every rank must call these functions together.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kiln.train import distributed
from kiln.train.checkpoint import RESUME_KEYS, load_checkpoint, state
from kiln.train.reproducibility import rng_state, set_rng_state

if TYPE_CHECKING:
    from kiln.train.trainer import Trainer


def sharded(trainer: Trainer) -> bool:
    return trainer.engine.strategy == "fsdp"


def capture(trainer: Trainer, step: int) -> dict[str, Any]:
    """The run's state at ``step`` (writes the shard folder first under FSDP2)."""
    model = trainer.engine.model
    assert model is not None
    out: dict[str, Any] = {
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "engine": trainer.engine.state_dict(),
        "rng": distributed.all_gather_object(rng_state()),
        "loop": {
            "epoch": trainer.epoch,
            "batch": trainer.batch_in_epoch,
            "step": trainer.step,
            "micro": trainer.micro,
            "lr_scale": trainer.lr_scale,
            "rollbacks": trainer.rollbacks,
            "nonfinite_skipped": trainer.nonfinite_skipped,
        },
        "techniques": trainer.tech.state_dict(),
        # A loss with parameters (learned multi-task weights) trains with the model.
        "loss": trainer.loss_fn.state_dict() if isinstance(trainer.loss_fn, nn.Module) else None,
        "best": dict(trainer.best),
        "world_size": trainer.engine.world.size,
        "config": trainer.cfg.model_dump(mode="json"),
        # Where earlier processes of this run resumed (outside "loop": it is history, not state).
        "resumed_from": list(trainer.resumed_from),
    }
    with state.outside_model(trainer.optimizer) as extra:
        if sharded(trainer):
            folder = f"step-{step}.dcp"
            state.save_sharded(model, trainer.optimizer, trainer.ckpts.dir / folder)
            out["sharded"] = folder
        else:
            out["model"], out["optimizer"] = state.full_state(model, trainer.optimizer)
    if extra:
        out["loss_optimizer"] = state.outside_state(trainer.optimizer, extra)
    return out


def restore(trainer: Trainer, path: Path) -> dict[str, Any]:
    """Load a checkpoint file (and its shard folder, if any) into ``trainer``; return the file's
    dict (its ``loop`` counters and ``resumed_from`` history, for the caller's bookkeeping)."""
    saved = load_checkpoint(path, map_location="cpu", require=RESUME_KEYS)
    model = trainer.engine.model
    assert model is not None
    if trainer.tech.freezer is not None:
        # The trained set at the saved epoch, before the optimizer state (which covers exactly
        # the parameters that had gradients then) is loaded.
        trainer.tech.freezer.apply(model, saved["loop"]["epoch"])
    with state.outside_model(trainer.optimizer) as extra:
        if "sharded" in saved:
            state.load_sharded(model, trainer.optimizer, path.parent / saved["sharded"])
        else:
            state.load_full_state(model, trainer.optimizer, saved["model"], saved["optimizer"])
    if extra:
        state.load_outside_state(trainer.optimizer, extra, saved.get("loss_optimizer", []))
    if trainer.scheduler and saved.get("scheduler"):
        trainer.scheduler.load_state_dict(saved["scheduler"])
    trainer.engine.load_state_dict(saved["engine"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    rank = trainer.engine.world.rank
    # Same world size: each rank continues its own RNG stream; otherwise rank 0's is reused.
    set_rng_state(rngs[rank] if len(rngs) == trainer.engine.world.size else rngs[0])
    loop = saved["loop"]
    trainer.epoch, trainer.batch_in_epoch, trainer.step = loop["epoch"], loop["batch"], loop["step"]
    trainer.micro = int(loop.get("micro", 1))
    trainer.lr_scale = float(loop.get("lr_scale", 1.0))
    trainer.rollbacks = int(loop.get("rollbacks", 0))
    trainer.nonfinite_skipped = int(loop.get("nonfinite_skipped", 0))
    trainer.best = dict(saved.get("best", {}))
    trainer.tech.load_state_dict(saved.get("techniques", {}), trainer.optimizer)
    if isinstance(trainer.loss_fn, nn.Module) and saved.get("loss") is not None:
        trainer.loss_fn.load_state_dict(saved["loss"])
    return saved


def best_weights(trainer: Trainer, best_file: Path | None) -> nn.Module | None:
    """A plain copy of the model with the best checkpoint's weights (rank 0; None elsewhere)."""
    model = trainer.engine.model
    assert model is not None
    if sharded(trainer):
        if best_file is not None:  # every rank loads its shard of the best, then gathers
            best_state = load_checkpoint(best_file, map_location="cpu")
            state.load_sharded(model, None, best_file.parent / best_state["sharded"])
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=state._options(True))
        if not trainer.engine.world.is_zero:
            return None
        plain = copy.deepcopy(trainer.template)
        plain.load_state_dict(full)
        return plain.to(trainer.engine.device)
    if not trainer.engine.world.is_zero:
        return None
    plain = copy.deepcopy(model)
    if best_file is not None:
        saved = load_checkpoint(best_file, map_location=trainer.engine.device)
        plain.load_state_dict(saved["model"])
        ema_state = saved.get("techniques", {}).get("ema")
        if ema_state is not None and trainer.cfg.ema.evaluate:
            from kiln.algorithms.ema import EMA  # the best checkpoint's EMA weights

            ema = EMA(plain)
            ema.load_state_dict(ema_state)
            ema.copy_to(plain)
    return plain

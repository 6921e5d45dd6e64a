"""Process groups under PyTorch's own launcher (torchrun), rank-zero helpers, elastic restarts.

Kiln never spawns processes: ``torchrun --nproc-per-node N -m kiln train ...`` starts them and sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; this module joins them.

Elastic restarts: after ``torchrun --max-restarts`` restarts a worker group, the new group talks
through the same agent store as the old one, and gloo's full-mesh connect can read the dead
group's peer addresses ("connectFullMesh failed ... Connection refused"). Creating the group on a
``PrefixStore`` keyed by ``TORCHELASTIC_RESTART_COUNT`` gives every attempt its own keys.

Example:
    >>> world = World.from_env()
    >>> world.size, world.rank, world.is_zero
    (1, 0, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "single", "ddp", "fsdp", "dp", "horovod")


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, world size, local rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> World:
        """Read torchrun's variables (a plain ``python`` run is rank 0 of 1)."""
        return World(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_strategy(strategy: str, world: World) -> str:
    """``auto`` -> ``ddp`` when several processes were launched, else ``single``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if strategy == "horovod":
        raise ValueError(
            "strategy=horovod is not supported: Horovod is unmaintained (last release 2023) and "
            "does not build against current PyTorch; launch the same job with PyTorch's own "
            "launcher instead: torchrun --nproc-per-node N -m kiln train CONFIG strategy=ddp"
        )
    if strategy == "auto":
        return "ddp" if world.size > 1 else "single"
    if strategy == "single" and world.size > 1:
        raise ValueError(
            f"strategy=single but {world.size} processes were launched; use strategy=ddp or "
            "strategy=fsdp (or auto), or launch one process"
        )
    return strategy


def init_process_group(device: torch.device, world: World) -> bool:
    """Join (or create, for a world of one) the default process group. True if created here.

    Backend: nccl on CUDA, gloo otherwise. Under torchrun's agent store the group is created on a
    ``PrefixStore`` keyed by the restart count (see the module docstring).
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=int(os.environ.get("KILN_DIST_TIMEOUT", "600")))
    if world.size == 1 and not launched_by_torchrun():
        # One process asked for ddp/fsdp: a private in-memory store, so the same code path runs.
        store: Any = dist.HashStore()
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world.size,
            is_master=False,
            timeout=timeout,
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"kiln/attempt{attempt}", base)
    else:
        dist.init_process_group(backend, timeout=timeout)
        return True
    dist.init_process_group(
        backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout
    )
    return True


def destroy() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max of ``t`` over ranks in place (no-op without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


ELASTIC_MARK = "elastic_run_id"


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def elastic_run_dir(out_dir: Path, name: str) -> Path | None:
    """The run directory an earlier attempt of this torchrun job created, if any.

    torchrun keeps ``TORCHELASTIC_RUN_ID`` across restarts; the first attempt records it in
    ``<run>/elastic_run_id`` (:func:`mark_elastic_run`), so a restarted group finds its run and
    resumes from the last checkpoint instead of starting a new one.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or restart_count() == 0 or not out_dir.is_dir():
        return None
    for d in sorted(out_dir.glob(f"{name}*")):
        mark = d / ELASTIC_MARK
        if mark.is_file() and mark.read_text().strip() == run_id:
            return d
    return None


def mark_elastic_run(run_dir: Path) -> None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and launched_by_torchrun():
        (run_dir / ELASTIC_MARK).write_text(run_id)

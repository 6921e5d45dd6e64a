"""Model wrapping for each strategy, in one place: DDP, FSDP2, DataParallel.

* ``ddp``: ``DistributedDataParallel``; gradients are all-reduced in backward, skipped on
  non-update micro-steps with ``no_sync()``.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each block (modules whose class
  name ends in ``Block``, else each Linear/Conv layer), then on the root; a
  ``MixedPrecisionPolicy`` from the run's precision (bf16 params, fp32 gradient reduction).
* ``dp``: ``nn.DataParallel`` for users coming from the guides, with a warning saying why DDP is
  better; without several GPUs it falls back to one process.

Example:
    >>> import torch
    >>> model = wrap(torch.nn.Linear(2, 2), strategy="single", device=torch.device("cpu"),
    ...              precision="fp32", sync_batchnorm=False)
    >>> type(model).__name__
    'Linear'
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from kiln.train import distributed

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards separately (each gathers its parameters only when it runs)."""
    custom = getattr(model, "fsdp_units", None)
    if callable(custom):
        return list(custom())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__.endswith("Block")]
    if blocks:
        return blocks
    return [m for m in model.modules() if m is not model and isinstance(m, _LAYERS)]


def wrap(
    model: nn.Module,
    *,
    strategy: str,
    device: torch.device,
    precision: str,
    sync_batchnorm: bool,
) -> nn.Module:
    """Wrap ``model`` (already on ``device``) for ``strategy``; returns the module to call."""
    if sync_batchnorm and strategy in ("ddp", "fsdp"):
        if device.type != "cuda":
            raise ValueError(
                "sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm is GPU-only); on "
                "CPU each rank keeps its own BatchNorm statistics: set sync_batchnorm=false"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        return _fully_shard(model, precision)
    if strategy == "dp":
        if device.type == "cuda" and torch.cuda.device_count() > 1:
            warnings.warn(
                "strategy=dp (nn.DataParallel) runs one process that scatters each batch over "
                f"{torch.cuda.device_count()} GPUs and gathers outputs on GPU 0 every step: "
                "slower than DDP and limited by the GIL; prefer torchrun ... strategy=ddp",
                UserWarning,
                stacklevel=3,
            )
            return nn.DataParallel(model)
        warnings.warn(
            "strategy=dp needs several CUDA GPUs; falling back to single-process training",
            UserWarning,
            stacklevel=3,
        )
    return model


def _fully_shard(model: nn.Module, precision: str) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise ValueError(
            "strategy=fsdp with precision=fp16 is not supported (it needs a sharded grad scaler); "
            "use precision=bf16, which needs no scaler"
        )
    if not distributed.is_distributed():
        raise RuntimeError("strategy=fsdp needs a process group; the Engine creates one")
    dtype = torch.bfloat16 if precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for unit in fsdp_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model

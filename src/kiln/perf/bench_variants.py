"""The variants of a technique ablation: what each changes, which apply, and the pick.

:func:`plan_variants` lists the changes :func:`kiln.perf.bench.ablate` measures against the job
as configured, each a change to the baseline (:data:`VARIANTS`):

* ``precision``: ``precision=bf16`` (``fp32`` when the baseline already uses bf16);
* ``compile``: ``compile=true`` (its first updates compile; they are warm-up, not timed);
* ``channels_last``: ``channels_last=true`` (4-D image inputs only);
* ``checkpointing``: ``train.activation_checkpointing=true`` (recompute in backward);
* ``accumulate``: half the batch, twice the accumulation (same effective batch, less memory);
* ``workers``: ``data.num_workers`` > 0 with persistent workers;
* ``pin_memory``: page-locked host batches (CUDA only);
* ``foreach`` / ``forloop``: the optimizer's multi-tensor or per-parameter implementation
  instead of Kiln's default fused kernels. The config has no switch for this, so the built
  optimizer's param groups are changed in code (``fused=False``, ``foreach=True/False``)
  before the first step; these rows are never written by ``--apply``;
* ``batch_x2``: twice ``data.batch_size`` (same samples, half the updates, same LR).

Variants that cannot apply are skipped with the reason (pin_memory without a GPU, channels_last
on flat inputs). :func:`set_optimizer_impl` switches a built optimizer for the ``foreach`` and
``forloop`` rows; :func:`kiln.perf.bench.pick_best` picks the row ``--apply`` writes.

Example:
    >>> from kiln.config import load_config
    >>> from kiln.data.base import DataInfo
    >>> info = DataInfo("classification", (64,), num_classes=10)
    >>> [v.name for v in plan_variants(load_config(None), info, torch.device("cpu"))][:2]
    ['baseline', 'precision']
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.config import Config
from kiln.data.base import DataInfo
from kiln.perf.measure import cpu_cores

__all__ = [
    "VARIANTS",
    "Variant",
    "plan_variants",
    "set_optimizer_impl",
]

VARIANTS = (
    "baseline",
    "precision",
    "compile",
    "channels_last",
    "checkpointing",
    "accumulate",
    "workers",
    "pin_memory",
    "foreach",
    "forloop",
    "batch_x2",
)


@dataclass(frozen=True)
class Variant:
    """One change to the baseline.

    Attributes:
        name: its name in :data:`VARIANTS`.
        change: what changes, for the table.
        overrides: dotted config overrides (what ``--apply`` writes).
        optimizer: ``foreach`` or ``forloop`` to switch the optimizer implementation in code.
        skip: why it is not measured, or None.
    """

    name: str
    change: str
    overrides: tuple[str, ...] = ()
    optimizer: str | None = None
    skip: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def plan_variants(
    cfg: Config,
    info: DataInfo,
    device: torch.device,
    names: Sequence[str] | None = None,
) -> list[Variant]:
    """The variants of ``cfg`` to run, in :data:`VARIANTS` order, with skip reasons.

    Args:
        cfg: the baseline job.
        info: the data's description (image inputs or flat features, for the model check).
        device: where the job runs.
        names: the variants wanted (None: all); the baseline is always included.

    Example:
        >>> from kiln.config import load_config
        >>> from kiln.data.base import DataInfo
        >>> info = DataInfo("classification", (64,), num_classes=10)
        >>> plan = plan_variants(load_config(None), info, torch.device("cpu"))
        >>> {v.name: v.skip for v in plan}["channels_last"]
        'inputs are not images (one example is (64,)); channels_last changes 4-D tensors only'
    """
    wanted = set(names or VARIANTS) | {"baseline"}
    d, t = cfg.data, cfg.train
    bs, k = d.batch_size, t.accumulate
    out: list[Variant] = [Variant("baseline", "as configured")]

    def add(name: str, overrides: Sequence[str], skip: str | None = None) -> None:
        if name in wanted:
            out.append(Variant(name, " ".join(overrides), tuple(overrides), skip=skip))

    if cfg.precision == "bf16":
        add("precision", ["precision=fp32"])
    else:
        why = None
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            why = "this GPU has no bf16 support"
        add("precision", ["precision=bf16"], why)

    why = None
    if not cfg.compile and device.type == "cpu" and _compiler() is None:
        why = "torch.compile's CPU backend needs a C++ compiler (g++ or clang++); none found"
    add("compile", [f"compile={str(not cfg.compile).lower()}"], why)

    why = None
    if len(info.input_shape) != 3:
        shape = tuple(info.input_shape)
        why = (
            f"inputs are not images (one example is {shape}); channels_last changes 4-D "
            "tensors only"
        )
    add("channels_last", [f"channels_last={str(not cfg.channels_last).lower()}"], why)

    if t.activation_checkpointing:
        add("checkpointing", ["train.activation_checkpointing=false"])
    else:
        add(
            "checkpointing", ["train.activation_checkpointing=true"], _checkpointing_skip(cfg, info)
        )

    why = None if bs % 2 == 0 else f"data.batch_size={bs} does not halve exactly"
    add("accumulate", [f"data.batch_size={bs // 2}", f"train.accumulate={2 * k}"], why)

    if d.num_workers:
        add("workers", ["data.num_workers=0"])
    else:
        cores = cpu_cores()
        why = None if cores >= 2 else "one CPU core: a worker process would compete with training"
        add(
            "workers",
            [f"data.num_workers={max(1, min(4, cores // 2))}", "data.persistent_workers=true"],
            why,
        )

    if device.type == "cuda":
        pinned = d.pin_memory is True or d.pin_memory == "auto"
        add("pin_memory", [f"data.pin_memory={str(not pinned).lower()}"])
    else:
        why = f"pin_memory only speeds up host-to-GPU copies; this job runs on {device.type}"
        add("pin_memory", ["data.pin_memory=true"], why)

    for name in ("foreach", "forloop"):
        if name in wanted:
            out.append(Variant(name, f"optimizer {name} (not fused)", optimizer=name))
    add("batch_x2", [f"data.batch_size={2 * bs}"])
    return out


def _checkpointing_skip(cfg: Config, info: DataInfo) -> str | None:
    """Why activation checkpointing cannot apply to the model, or None when it can."""
    from kiln.algorithms.activation_checkpointing import apply_activation_checkpointing
    from kiln.train import build

    try:
        apply_activation_checkpointing(build.build_model_for(cfg, info))
    except ValueError as exc:
        return f"nothing to checkpoint: {exc}"
    return None


def set_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Switch a built optimizer to torch's ``foreach`` or ``forloop`` implementation.

    Call it before the first step: the state created on the first step (the ``step`` counter's
    device and dtype) follows the implementation. The math is the same; only the kernels change.

    Args:
        optimizer: an Adam/AdamW/SGD (any optimizer whose groups carry ``fused``/``foreach``).
        impl: ``foreach`` (one kernel per op over all tensors) or ``forloop`` (one per tensor).

    Example:
        >>> net = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(net.parameters(), fused=True)
        >>> set_optimizer_impl(opt, "forloop")
        >>> opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]
        (False, False)
    """
    if impl not in ("foreach", "forloop"):
        raise ValueError(f"optimizer implementation must be foreach or forloop, got {impl!r}")
    if optimizer.state:
        raise ValueError("set the optimizer implementation before its first step")
    for group in [optimizer.defaults, *optimizer.param_groups]:
        if "fused" not in group or "foreach" not in group:
            raise ValueError(f"{type(optimizer).__name__} has no fused/foreach implementations")
        group["fused"] = False
        group["foreach"] = impl == "foreach"
    # A fused optimizer unscales fp16 gradients itself; the others need the GradScaler to.
    optimizer._step_supports_amp_scaling = False  # type: ignore[attr-defined]

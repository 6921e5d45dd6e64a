"""Measurement helpers the perf tools share: op tables, quiet configs, memory and machine facts.

* :class:`OpRow`, :func:`op_rows` and :func:`ops_markdown`: the top ops of a ``torch.profiler``
  profile and their markdown table;
* :func:`measurement_config`: a quiet copy of a config (no progress bar, TensorBoard or resume);
* :func:`planned_updates`: the optimizer updates a full run of a config takes;
* :func:`resident_bytes` and :func:`cpu_peak_bytes`: CPU memory, as ``kiln tune batch``
  measures it;
* :func:`machine_facts` and :func:`cpu_cores`: what the numbers depend on.

Example:
    >>> import torch
    >>> with torch.profiler.profile() as prof:
    ...     _ = torch.randn(64, 64) @ torch.randn(64, 64)
    >>> rows = op_rows(prof.key_averages(), sort_by="self_cpu_ms", limit=3)
    >>> ops_markdown(rows).splitlines()[0]
    '| op | calls/step | self CPU ms/step | CPU total ms/step | self CPU mem KB/step |'
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.config import Config, apply_overrides, validate
from kiln.data.base import DataBundle

__all__ = [
    "OpRow",
    "cpu_cores",
    "cpu_peak_bytes",
    "machine_facts",
    "measurement_config",
    "op_rows",
    "ops_markdown",
    "planned_updates",
    "resident_bytes",
]

# Marker events of the profiler itself, not work of the job.
_SKIPPED_OPS = ("ProfilerStep", "[memory]")
# "<built-in method run_backward of torch._C._EngineBase object at 0x7f...>" -> "<built-in
# method run_backward>": the address differs per run and the owner's type name can be long.
_OWNER = re.compile(r" of [^<>]* at 0x[0-9a-fA-F]+>$")


@dataclass
class OpRow:
    """One operator of the profile, summed over the recorded updates.

    Attributes:
        name: operator or annotated region (``aten::addmm``, ``Optimizer.step#AdamW.step``).
        calls: times it ran.
        self_cpu_ms: CPU time in the op itself, children excluded.
        cpu_total_ms: CPU time including the ops it called.
        self_device_ms: GPU kernel time of the op itself (0 on CPU).
        self_cpu_mem_bytes: CPU bytes the op allocated minus the bytes it freed.
        self_device_mem_bytes: the same on the GPU.
    """

    name: str
    calls: int
    self_cpu_ms: float
    cpu_total_ms: float
    self_device_ms: float
    self_cpu_mem_bytes: int
    self_device_mem_bytes: int


def measurement_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """``cfg`` with dotted overrides, quiet: no progress bar, no TensorBoard, no resume.

    The perf tools train in a scratch run directory; these settings keep the Trainer from
    printing, writing event files or continuing an earlier run while it is measured.

    Example:
        >>> from kiln.config import load_config
        >>> measurement_config(load_config(None), ["precision=bf16"]).log.tensorboard
        False
    """
    quiet = ["log.progress=false", "log.tensorboard=false", "resume=null", *overrides]
    return validate(apply_overrides(cfg.model_dump(mode="json"), quiet))


def op_rows(events: Any, *, sort_by: str, limit: int) -> list[OpRow]:
    """The top ``limit`` ops of ``prof.key_averages()`` by one of :class:`OpRow`'s fields.

    Profiler marker events (``ProfilerStep#N``, ``[memory]``) are left out; Python built-ins
    recorded with ``with_stack`` lose their object address (``<built-in method run_backward>``).

    Example:
        >>> import torch
        >>> with torch.profiler.profile() as prof:
        ...     _ = torch.randn(64, 64) @ torch.randn(64, 64)
        >>> [r.name for r in op_rows(prof.key_averages(), sort_by="self_cpu_ms", limit=5)]
        ... # doctest: +ELLIPSIS
        [...'aten::mm'...]
    """
    rows = []
    for e in events:
        if e.key.startswith(_SKIPPED_OPS):
            continue
        rows.append(
            OpRow(
                name=_OWNER.sub(">", e.key),
                calls=int(e.count),
                self_cpu_ms=e.self_cpu_time_total / 1e3,
                cpu_total_ms=e.cpu_time_total / 1e3,
                self_device_ms=getattr(e, "self_device_time_total", 0.0) / 1e3,
                self_cpu_mem_bytes=int(e.self_cpu_memory_usage),
                self_device_mem_bytes=int(getattr(e, "self_device_memory_usage", 0)),
            )
        )
    rows.sort(key=lambda r: getattr(r, sort_by), reverse=True)
    return rows[:limit]


def ops_markdown(rows: Sequence[OpRow], *, per_step: int = 1, device: bool = False) -> str:
    """A markdown table of op rows; times and calls divided by ``per_step`` updates.

    Example:
        >>> row = OpRow("aten::mm", 4, 2.0, 2.5, 0.0, 4096, 0)
        >>> print(ops_markdown([row], per_step=2).splitlines()[2])
        | aten::mm | 2 | 1.000 | 1.250 | 2.0 |
    """
    head = ["op", "calls/step", "self CPU ms/step", "CPU total ms/step"]
    head += ["self GPU ms/step", "self GPU mem KB/step"] if device else ["self CPU mem KB/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.name,
            f"{r.calls / per_step:g}",
            f"{r.self_cpu_ms / per_step:.3f}",
            f"{r.cpu_total_ms / per_step:.3f}",
        ]
        if device:
            cells += [
                f"{r.self_device_ms / per_step:.3f}",
                f"{r.self_device_mem_bytes / 1024 / per_step:.1f}",
            ]
        else:
            cells.append(f"{r.self_cpu_mem_bytes / 1024 / per_step:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def planned_updates(cfg: Config, data: DataBundle) -> int:
    """Optimizer updates a full run of ``cfg`` takes (``train.max_steps`` or epochs x updates).

    Example:
        >>> from kiln.config import load_config
        >>> from kiln.train.build import build_data_for
        >>> cfg = load_config(None, ["train.epochs=3", "data.batch_size=64"])
        >>> planned_updates(cfg, build_data_for(cfg))  # 1257 train examples: 20 batches
        60
    """
    from kiln.data.loader import batch_sizes

    if cfg.train.max_steps:
        return cfg.train.max_steps
    n = len(data.train)  # type: ignore[arg-type]
    batches = len(batch_sizes(n, cfg.data.batch_size, cfg.data.drop_last))
    # ceil(batches / k): a partial last group is an update too (kiln.train.accumulation's rule;
    # this module sits below kiln.train, so it cannot import it).
    return -(-batches // cfg.train.accumulate) * cfg.train.epochs


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one).

    Example:
        >>> cpu_cores() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of parameters, gradients, buffers and optimizer state.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> resident_bytes(net, torch.optim.SGD(net.parameters(), lr=0.1))
        40
    """
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def cpu_peak_bytes(prof: torch.profiler.profile) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU during a profile.

    The profiler's memory events record every allocation and free of the CPU allocator in order
    (``nbytes`` positive or negative); their running sum is the live tensor memory above the
    level at the start, and its maximum is the peak (the method of
    :func:`kiln.algorithms.finders.peak_step_memory`).

    Example:
        >>> with torch.profiler.profile(profile_memory=True) as prof:
        ...     _ = torch.zeros(1024, 1024).sum()
        >>> cpu_peak_bytes(prof) >= 4 * 1024 * 1024
        True
    """
    from torch.autograd import DeviceType

    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError("the profiler returned no events; cannot measure CPU memory")
    events = [
        e for e in results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # type: ignore[attr-defined]  # missing from the stubs
        peak = max(peak, live)
    return peak


def machine_facts(device: torch.device) -> str:
    """Torch version, threads, cores, CPU or GPU model and load: what the numbers depend on.

    Example:
        >>> "torch threads" in machine_facts(torch.device("cpu"))
        True
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"torch {torch.__version__}", f"{torch.get_num_threads()} torch threads"]
    parts.append(f"{cpu_cores()} cores ({cpu})")
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    with contextlib.suppress(OSError):
        parts.append("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return "; ".join(parts)

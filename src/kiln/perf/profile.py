"""``torch.profiler`` over real training steps: a trace, TensorBoard files and the top ops.

:func:`profile_training` runs the job a config describes through the :class:`~kiln.Trainer`,
with a :class:`ProfilerCallback` that starts ``torch.profiler`` when the fit starts, steps it
after every optimizer update (``on_update_end``) and asks the Trainer to stop once the schedule
(``wait`` idle updates, ``warmup`` traced-but-discarded updates, ``active`` recorded updates,
``repeat`` times) is done. So what is profiled is exactly what ``kiln train`` runs: the same
data loader, Engine (precision, accumulation, compile), optimizer and callbacks, one profiler
step per optimizer update.

What it writes into ``out``:

* ``trace.json``: the Chrome trace of the last active cycle (``export_chrome_trace``; open it in
  ``chrome://tracing`` or https://ui.perfetto.dev);
* ``tb/``: the same trace for TensorBoard's profiler plugin
  (``torch.profiler.tensorboard_trace_handler``; ``tensorboard --logdir OUT/tb``), one file per
  cycle;
* ``cuda_memory_snapshot.pickle`` when the job runs on a CUDA GPU: the allocator history
  (``torch.cuda.memory._record_memory_history``), to drop on https://pytorch.org/memory_viz.

The module also holds the small measurement helpers the perf tools share:
:func:`measurement_config` (a quiet copy of a config), :func:`resident_bytes` and
:func:`cpu_peak_bytes` (CPU memory, as ``kiln tune batch`` measures it), :func:`machine_facts`.

The profiler records input shapes, memory and Python stacks (``record_shapes``,
``profile_memory``, ``with_stack``), which slows the profiled steps down: use the trace and the
tables for *where* time and memory go, and ``kiln bench`` for how fast the job runs.

Example:
    >>> from kiln.config import load_config
    >>> cfg = load_config("configs/digits_mlp.yaml")                  # doctest: +SKIP
    >>> result = profile_training(cfg, "runs/digits_mlp-profile")      # doctest: +SKIP
    >>> result.by_time[0].name                                          # doctest: +SKIP
    'aten::addmm'
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config, apply_overrides, validate
from kiln.data.base import DataBundle

__all__ = [
    "OpRow",
    "ProfileResult",
    "ProfilerCallback",
    "Schedule",
    "cpu_cores",
    "cpu_peak_bytes",
    "machine_facts",
    "measurement_config",
    "op_rows",
    "ops_markdown",
    "planned_updates",
    "profile_training",
    "resident_bytes",
]

# Marker events of the profiler itself, not work of the job.
_SKIPPED_OPS = ("ProfilerStep", "[memory]")
# "<built-in method run_backward of torch._C._EngineBase object at 0x7f...>" -> "<built-in
# method run_backward>": the address differs per run and the owner's type name can be long.
_OWNER = re.compile(r" of [^<>]* at 0x[0-9a-fA-F]+>$")


@dataclass(frozen=True)
class Schedule:
    """The profiler schedule, in optimizer updates (``torch.profiler.schedule``).

    Attributes:
        wait: updates skipped at the start of each cycle (first-step allocations, lazy init).
        warmup: updates traced and discarded (the profiler's own start-up cost).
        active: updates recorded per cycle.
        repeat: cycles; each one writes a trace.

    Example:
        >>> Schedule(wait=1, warmup=1, active=3, repeat=2).total
        10
    """

    wait: int = 1
    warmup: int = 1
    active: int = 5
    repeat: int = 1

    def __post_init__(self) -> None:
        for name in ("wait", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"profile.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("active", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        """Optimizer updates the whole schedule takes."""
        return (self.wait + self.warmup + self.active) * self.repeat


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


@dataclass
class ProfileResult:
    """What :func:`profile_training` measured and where it wrote the files."""

    out: Path
    trace: Path
    tb_dir: Path
    device: str
    schedule: Schedule
    by_time: list[OpRow]
    by_memory: list[OpRow]
    self_cpu_total_ms: float
    self_device_total_ms: float
    memory_snapshot: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready for ``json.dumps``."""
        out = asdict(self)
        for key in ("out", "trace", "tb_dir", "memory_snapshot"):
            out[key] = None if out[key] is None else str(out[key])
        return out


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


class ProfilerCallback:
    """A Trainer callback that drives ``torch.profiler`` over optimizer updates.

    At ``on_fit_start`` it builds the profiler with ``make_profiler(device)`` (so the CUDA
    activity is added only when the Engine runs on a GPU) and starts it; after every update
    it calls ``profiler.step()``; after ``steps`` updates it stops the profiler and asks the
    Trainer to stop (a plain stop: the run ends normally). On a CUDA device with ``snapshot``
    set it also records the caching allocator's history from the start and dumps it there.

    Args:
        make_profiler: the Engine's device -> a configured, not yet started profiler.
        steps: updates to profile (the schedule's total).
        snapshot: file for the CUDA memory snapshot (ignored on other devices), or None.

    Example:
        >>> import torch
        >>> sched = torch.profiler.schedule(wait=0, warmup=1, active=2, repeat=1)
        >>> cb = ProfilerCallback(lambda device: torch.profiler.profile(schedule=sched), 3)
        >>> Trainer(cfg, callbacks=[cb]).fit()                          # doctest: +SKIP
        >>> cb.profiler.key_averages()                                  # doctest: +SKIP
    """

    def __init__(
        self,
        make_profiler: Callable[[torch.device], torch.profiler.profile],
        steps: int,
        snapshot: Path | None = None,
    ) -> None:
        self.make_profiler = make_profiler
        self.steps = steps
        self.snapshot = snapshot
        self.profiler: torch.profiler.profile | None = None
        self.device: torch.device | None = None
        self.done = 0
        self.running = False

    @property
    def snapshot_written(self) -> Path | None:
        """The CUDA memory snapshot file, when one was written."""
        on_gpu = self.device is not None and self.device.type == "cuda"
        return self.snapshot if on_gpu and self.snapshot is not None else None

    def on_fit_start(self, trainer: Any) -> None:
        self.device = trainer.engine.device
        self.profiler = self.make_profiler(trainer.engine.device)
        if self.snapshot_written is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler.start()
        self.running = True

    def on_update_end(self, trainer: Any, step: int) -> None:
        if not self.running or self.profiler is None:
            return
        try:
            self.profiler.step()
        except BaseException:
            # A profiler that failed inside a transition crashes the process on stop()
            # (torch 2.13): leave it alone and let the error propagate.
            self.running = False
            raise
        self.done += 1
        if self.done >= self.steps:
            self._stop()
            trainer.request_stop("profile schedule complete")

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        if self.running:
            self._stop()

    def _stop(self) -> None:
        self.running = False
        assert self.profiler is not None
        self.profiler.stop()
        snapshot = self.snapshot_written
        if snapshot is not None:
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)


def _trace_ready(tb_dir: Path, trace: Path) -> Callable[[torch.profiler.profile], None]:
    """TensorBoard's handler, then a copy of the Chrome trace it exported to ``trace``.

    A profile exports its trace once (a second ``export_chrome_trace`` raises), so the file
    the TensorBoard handler wrote is copied rather than exported twice.
    """
    handler = torch.profiler.tensorboard_trace_handler(str(tb_dir))

    def ready(prof: torch.profiler.profile) -> None:
        before = set(tb_dir.glob("*.pt.trace.json")) if tb_dir.exists() else set()
        handler(prof)
        new = sorted(set(tb_dir.glob("*.pt.trace.json")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            shutil.copyfile(new[-1], trace)

    return ready


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


def profile_training(
    cfg: Config,
    out: str | Path,
    *,
    schedule: Schedule | None = None,
    rows: int = 10,
    model: nn.Module | None = None,
    data: DataBundle | None = None,
) -> ProfileResult:
    """Profile ``schedule.total`` optimizer updates of the job ``cfg`` describes.

    The Trainer runs in a scratch run directory (deleted afterwards); when the config trains
    fewer updates than the schedule needs, ``train.max_steps`` is raised to cover it.

    Args:
        cfg: the job.
        out: folder for ``trace.json``, ``tb/`` and the CUDA memory snapshot (created).
        schedule: wait/warmup/active/repeat in updates (default ``Schedule()``: 1/1/5/1).
        rows: ops in each top table.
        model: a user's own ``nn.Module`` (as for :class:`~kiln.Trainer`).
        data: a user's own :class:`~kiln.DataBundle`.

    Returns:
        The top ops by self time and by self memory of the last active cycle, and the paths.

    Example:
        >>> from kiln.config import load_config
        >>> cfg = load_config(None, ["model.kwargs.hidden=[32]"])
        >>> res = profile_training(cfg, "/tmp/kiln-prof", rows=3)       # doctest: +SKIP
        >>> res.trace.name                                              # doctest: +SKIP
        'trace.json'
    """
    from kiln.train import build
    from kiln.train.trainer import Trainer, TrainingInterrupted

    schedule = schedule or Schedule()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tb_dir, trace = out / "tb", out / "trace.json"
    trace.unlink(missing_ok=True)
    data = data if data is not None else build.build_data_for(cfg)
    extra = []
    if planned_updates(cfg, data) < schedule.total:
        extra.append(f"train.max_steps={schedule.total}")
    cfg = measurement_config(cfg, extra)

    def make_profiler(device: torch.device) -> torch.profiler.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=schedule.wait,
                warmup=schedule.warmup,
                active=schedule.active,
                repeat=schedule.repeat,
            ),
            on_trace_ready=_trace_ready(tb_dir, trace),
            record_shapes=True,
            profile_memory=True,
            with_stack=True,
        )

    callback = ProfilerCallback(make_profiler, schedule.total, out / "cuda_memory_snapshot.pickle")
    with tempfile.TemporaryDirectory(prefix="kiln-profile-") as scratch:
        trainer = Trainer(
            cfg, model=model, data=data, callbacks=[callback], run_dir=scratch, verbose=False
        )
        try:
            trainer.fit()
        except TrainingInterrupted:  # Ctrl-C / SIGTERM: the scratch run is not resumable
            raise KeyboardInterrupt from None
    if not trace.is_file() or callback.profiler is None:
        raise RuntimeError(
            f"the profiler wrote no trace: training ended after {callback.done} updates, before "
            f"the schedule's {schedule.total}; lower profile.wait/profile.warmup or --steps"
        )
    on_gpu = trainer.engine.device.type == "cuda"
    time_key = "self_device_ms" if on_gpu else "self_cpu_ms"
    mem_key = "self_device_mem_bytes" if on_gpu else "self_cpu_mem_bytes"
    everything = op_rows(callback.profiler.key_averages(), sort_by=time_key, limit=10**9)
    notes = []
    if schedule.repeat > 1:
        notes.append(f"tables and trace.json show the last of {schedule.repeat} cycles")
    return ProfileResult(
        out=out,
        trace=trace,
        tb_dir=tb_dir,
        device=str(trainer.engine.device),
        schedule=schedule,
        by_time=everything[:rows],
        by_memory=sorted(everything, key=lambda r: getattr(r, mem_key), reverse=True)[:rows],
        self_cpu_total_ms=sum(r.self_cpu_ms for r in everything),
        self_device_total_ms=sum(r.self_device_ms for r in everything),
        memory_snapshot=callback.snapshot_written,
        notes=notes,
    )


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
    return math.ceil(batches / cfg.train.accumulate) * cfg.train.epochs


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

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

The op tables and the measurement helpers the perf tools share live in :mod:`kiln.perf.measure`
(re-exported here).

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

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config
from kiln.data.base import DataBundle
from kiln.doctor.threads import HostLoad, host_load, oversubscription_note
from kiln.perf.measure import (
    OpRow,
    cpu_cores,
    cpu_peak_bytes,
    machine_facts,
    measurement_config,
    op_rows,
    ops_markdown,
    planned_updates,
    resident_bytes,
)

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


def profile_training(
    cfg: Config,
    out: str | Path,
    *,
    schedule: Schedule | None = None,
    rows: int = 10,
    model: nn.Module | None = None,
    data: DataBundle | None = None,
    host: HostLoad | None = None,
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
        host: the host's cores, load and torch's threads (default: read before training,
            :func:`~kiln.doctor.threads.host_load`); when torch's threads do not fit
            beside the load, a note says so with the thread count to use.

    Returns:
        The top ops by self time and by self memory of the last active cycle, the paths, and
        notes (oversubscribed threads, several cycles).

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
    host = host if host is not None else host_load()  # before training adds to the load
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
    oversubscribed = oversubscription_note(host)
    if oversubscribed is not None:  # slow ops in the tables would be the host's, not the model's
        notes.append(oversubscribed)
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

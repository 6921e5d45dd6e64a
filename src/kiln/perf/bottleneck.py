"""Where a training step's time goes: data, transfer, forward, backward, optimizer, host syncs.

:func:`find_bottleneck` builds the job exactly as ``kiln train`` does
(:func:`kiln.train.build.build_parts`: the Trainer's loader, Engine, model, optimizer, loss,
scheduler and EMA, without a run directory) and runs the Trainer's own train step
(:func:`kiln.train.step.train_step`), whose ``lap`` hook reads a clock between the phases.
Like ``torch.utils.bottleneck`` it then runs the same updates under ``cProfile`` and under the
autograd profiler, in separate passes so neither inflates the phase times:

1. ``warmup`` updates, not measured (first-step allocations, lazy optimizer state, compile);
2. ``steps`` timed updates: each phase's wall time, mean per update;
3. ``steps`` updates under ``cProfile``: the Python functions with the most own time;
4. ``steps`` updates under ``torch.autograd.profiler.profile``: the top ops, and a count of the
   host reads of tensor values (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ...) by
   call site. On a GPU each host read waits for every queued kernel (a host-device sync); on a
   CPU there is nothing to wait for, so they cost almost nothing, but they are counted anyway:
   the same code on a GPU pays for each one.

The phases of one update (several micro-batches with accumulation) are:

* ``data``: the next batch from the loader (and Mixup/CutMix when configured);
* ``to_device``: the host-to-device copy (nothing on a CPU job);
* ``forward``: forward and loss under autocast; ``backward``: ``engine.backward``;
* ``optimizer``: unscale/clip, the optimizer step, zero_grad, the LR scheduler and EMA;
* ``syncs``: the loop's own host reads: the non-finite check of every update
  (``train.nonfinite``, one read) and the logged loss/grad-norm every ``train.log_every``.

On a GPU the clock is read after ``torch.cuda.synchronize()``, so each phase is charged with its
own kernels (the extra syncs make the step slightly slower than in ``kiln train``).

Example:
    >>> from kiln.config import load_config
    >>> report = find_bottleneck(load_config("configs/digits_mlp.yaml"), steps=5)  # doctest: +SKIP
    >>> report.dominant                                                            # doctest: +SKIP
    'backward'
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from kiln.config import Config
from kiln.perf.measure import OpRow, measurement_config, op_rows

__all__ = [
    "PHASES",
    "BottleneckReport",
    "FunctionRow",
    "HostReads",
    "SyncSite",
    "find_bottleneck",
]

PHASES = ("data", "to_device", "forward", "backward", "optimizer", "syncs")
_OUTLIER = 2.0  # an update slower than this times the median is an outlier

# Tensor methods that copy a value to the host and so wait for the device (a sync on a GPU).
_HOST_READS = frozenset(
    {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}
)

_HINTS = {
    "data": "the loader: in-memory tensors need no workers; for decoded/augmented samples try "
    "data.num_workers=N with data.persistent_workers=true (kiln bench measures it)",
    "to_device": "host-to-device copies: data.pin_memory=true (GPU), or keep the data on the "
    "device",
    "optimizer": "the update: a fused optimizer (Kiln picks it when every parameter is a plain "
    "CPU/CUDA tensor), fewer parameter tensors, or accumulation (fewer updates per sample)",
    "syncs": "host reads: raise train.log_every, or train.nonfinite=ignore to drop the "
    "per-update finite check",
}


def _compute_hint(cfg: Config, image: bool) -> str:
    """What may speed up forward/backward, leaving out what the config already does."""
    tries = [] if cfg.precision == "bf16" else ["precision=bf16"]
    tries += [] if cfg.compile else ["compile=true"]
    tries += ["channels_last=true"] if image and not cfg.channels_last else []
    tries.append(f"a larger data.batch_size than {cfg.data.batch_size} (better kernel use)")
    hint = "model compute: try " + ", ".join(tries) + " (kiln bench measures each)"
    if cfg.train.activation_checkpointing:
        hint += "; activation checkpointing recomputes the forward: turn it off if memory allows"
    return hint


@dataclass
class FunctionRow:
    """One Python function of the cProfile pass, per update.

    Attributes:
        name: function name (built-ins as cProfile writes them).
        where: ``file:line`` (package-relative), ``~`` for built-ins.
        calls: calls per update.
        own_ms: time in the function itself per update.
        cumulative_ms: time including the functions it called, per update.
    """

    name: str
    where: str
    calls: float
    own_ms: float
    cumulative_ms: float


@dataclass
class SyncSite:
    """A call site that reads tensor values on the host.

    Attributes:
        where: ``file:line (function)`` of the caller.
        what: the methods called there (``item``, ``__bool__``, ...).
        per_step: calls per update.
    """

    where: str
    what: str
    per_step: float


@dataclass
class BottleneckReport:
    """Phase times, sync counts and the top functions and ops of a few training updates.

    Attributes:
        device: the Engine's device.
        steps: updates per measured pass.
        step_ms: mean wall time of one update (outliers left out, see ``notes``); the clock
            reads are contiguous, so it is the sum of ``phases_ms``.
        phases_ms: mean time per update of each phase in :data:`PHASES`.
        step_ms_each: the wall time of each timed update, outliers included.
        syncs_per_step: host reads of device values per update (None when not counted).
        sync_sites: where they happen, most frequent first.
        device_syncs_per_step: ``cuda*Synchronize`` calls per update in the profile (GPU only).
        top_functions: cProfile's functions with the most own time.
        top_ops: the autograd profiler's ops with the most self time.
        notes: what the numbers mean on this device.
        compute_hint: what to try when forward or backward dominates (from the config).
    """

    device: str
    steps: int
    step_ms: float
    phases_ms: dict[str, float]
    step_ms_each: list[float]
    syncs_per_step: float | None
    sync_sites: list[SyncSite]
    device_syncs_per_step: float | None
    top_functions: list[FunctionRow]
    top_ops: list[OpRow]
    notes: list[str] = field(default_factory=list)
    compute_hint: str = "model compute: precision=bf16, compile=true, a larger batch"

    @property
    def shares(self) -> dict[str, float]:
        """Each phase's fraction of ``step_ms``."""
        return {k: v / self.step_ms if self.step_ms > 0 else 0.0 for k, v in self.phases_ms.items()}

    @property
    def dominant(self) -> str:
        """The phase that takes the most time."""
        return max(PHASES, key=lambda k: self.phases_ms[k])

    @property
    def hint(self) -> str:
        """What usually helps when :attr:`dominant` is the bottleneck."""
        return (
            self.compute_hint if self.dominant in ("forward", "backward") else _HINTS[self.dominant]
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready for ``json.dumps``."""
        out = asdict(self)
        out.update(shares=self.shares, dominant=self.dominant, hint=self.hint)
        return out


class HostReads(TorchFunctionMode):
    """Counts the host reads of tensor values by call site, while active.

    Only tensors on ``device`` count (on a GPU job, reading a CPU scalar costs no sync).

    Args:
        device: the device whose tensors count.

    Example:
        >>> t = torch.ones(2)
        >>> with HostReads(torch.device("cpu")) as reads:
        ...     _ = t.sum().item(), bool(t.all())
        >>> sorted(what for (_, what) in reads.counts)
        ['__bool__', 'item']
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device_type = device.type
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        arg = args[0] if args else None
        if (
            name in _HOST_READS
            and isinstance(arg, torch.Tensor)
            and arg.device.type == self.device_type
            and not (name == "cpu" and self.device_type == "cpu")  # a no-op on a CPU tensor
        ):
            frame = sys._getframe(1)
            where = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
            self.counts[f"{where} ({frame.f_code.co_name})", name] += 1
        return func(*args, **(kwargs or {}))


def _short(path: str) -> str:
    """A path from its package down (``torch/optim/adamw.py``, ``kiln/train/engine.py``)."""
    parts = path.replace(os.sep, "/").split("/")
    for root in ("kiln", "torch", "site-packages"):
        if root in parts:
            i = len(parts) - 1 - parts[::-1].index(root)
            return "/".join(parts[i + (root == "site-packages") :])
    return parts[-1]


class _Steps:
    """The Trainer's own train step (``kiln.train.step.train_step``), update after update,
    cycling over epochs, with the Trainer's logging reads every ``train.log_every`` updates."""

    def __init__(self, parts: Any, cfg: Any) -> None:
        from kiln.train.microbatch import AutoMicrobatch

        self.parts, self.cfg = parts, cfg
        self.epoch, self.step, self.micro = 0, 0, 1
        # train.auto_microbatch: the same halving and replay on out-of-memory as in training.
        accumulate = parts.engine.accumulate
        auto = (
            AutoMicrobatch(parts.per_rank_batch, accumulate=accumulate)
            if cfg.auto_microbatch
            else None
        )
        self.auto = auto
        self.batches = self._batches()
        self.losses: list[torch.Tensor] = []

    def _batches(self) -> Iterator[tuple[int, Any]]:
        from kiln.data.loader import start_epoch

        loader = self.parts.train_loader
        while True:
            start_epoch(loader, self.epoch, 0)
            yield from enumerate(loader)
            self.epoch += 1

    def update(self, lap: Callable[[str], None]) -> None:
        from kiln.train.step import mean_loss, train_step

        parts, cfg = self.parts, self.cfg
        sched = parts.scheduler
        # Not past the schedule's end (OneCycle refuses extra steps).
        per_update = sched is not None and sched.interval == "step"
        schedule = sched if per_update and self.step < parts.total_steps else None
        log_now = (self.step + 1) % cfg.log_every == 0
        result = train_step(
            parts,
            self.batches,
            self.losses,
            epoch=self.epoch,
            step=self.step,
            micro=self.micro,
            guard=cfg.nonfinite != "ignore",
            grad_norm=log_now,
            schedule=schedule,
            auto=self.auto,
            lap=lap,
        )
        assert result is not None  # the batches never run out
        self.micro = result.micro
        if not result.finite:
            parts.engine.zero_grad(parts.optimizer)  # a bad update is skipped here, whatever
            return  # the policy
        self.step += 1
        if log_now:  # what the Trainer's log reads on the host
            mean_loss(self.losses, parts.engine.world.size)
            if result.grad_norm is not None:
                result.grad_norm.item()
            self.losses.clear()
            lap("syncs")


def _no_lap(phase: str) -> None:
    return None


class _Clock:
    """Contiguous laps: each ``lap(phase)`` charges the time since the previous one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self.now()
        self.totals[phase] += now - self.last
        self.last = now


def _function_rows(stats: pstats.Stats, steps: int, limit: int) -> list[FunctionRow]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in raw.items():
        where = "~" if file == "~" else f"{_short(file)}:{line}"
        rows.append(
            FunctionRow(name, where, calls / steps, own * 1e3 / steps, cumulative * 1e3 / steps)
        )
    rows.sort(key=lambda r: r.own_ms, reverse=True)
    return rows[:limit]


def find_bottleneck(
    cfg: Config,
    *,
    steps: int = 5,
    warmup: int = 3,
    rows: int = 12,
    out: str | Path | None = None,
) -> BottleneckReport:
    """Time each phase of ``steps`` training updates, then profile them (see the module doc).

    Args:
        cfg: the job.
        steps: updates per measured pass (three passes).
        warmup: updates run first and not measured.
        rows: functions and ops in the top tables.
        out: when given, ``cprofile.pstats`` is written there (``python -m pstats``, snakeviz).

    Returns:
        The report; ``report.phases_ms`` sum to about ``report.step_ms``.

    Raises:
        ValueError: ``steps`` < 1 or ``warmup`` < 0.

    Example:
        >>> from kiln.config import load_config
        >>> r = find_bottleneck(load_config(None, ["model.kwargs.hidden=[32]"]))  # doctest: +SKIP
        >>> abs(sum(r.phases_ms.values()) - r.step_ms) < 0.05 * r.step_ms       # doctest: +SKIP
        True
    """
    from kiln.train.build import build_parts

    if steps < 1:
        raise ValueError(f"--steps must be >= 1 update, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 updates, got {warmup}")
    cfg = measurement_config(cfg)
    if cfg.meta.enabled:
        raise ValueError("meta.enabled=true runs the meta-learning loop, which has no train step")
    parts = build_parts(cfg, None, None)  # what the Trainer builds, without a run directory
    try:
        return _measure(cfg, parts, steps, warmup, rows, out)
    finally:
        parts.engine.close()


def _measure(
    cfg: Config, parts: Any, steps: int, warmup: int, rows: int, out: str | Path | None
) -> BottleneckReport:
    device = parts.engine.device
    on_gpu = device.type == "cuda"
    runner = _Steps(parts, cfg.train)
    parts.tech.train_mode(parts.model, parts.engine.model)
    for _ in range(warmup):
        runner.update(_no_lap)

    clock = _Clock(device)
    each: list[dict[str, float]] = []
    for _ in range(steps):
        before = dict(clock.totals)
        runner.update(clock.lap)
        each.append({k: (clock.totals[k] - before[k]) * 1e3 for k in PHASES})
    totals = [sum(u.values()) for u in each]
    typical = statistics.median(totals)
    # A shared machine's load bursts (or a collection) can make one update many times slower
    # than the rest; they are left out of the means and reported.
    kept = [u for u, total in zip(each, totals, strict=True) if total <= _OUTLIER * typical]
    phases = {k: statistics.fmean(u[k] for u in kept) for k in PHASES}
    step_ms = sum(phases.values())

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        runner.update(_no_lap)
    profiler.disable()
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(out) / "cprofile.pstats"))
    functions = _function_rows(pstats.Stats(profiler), steps, rows)

    notes: list[str] = []
    if len(kept) < steps:
        notes.append(
            f"{steps - len(kept)} of {steps} timed updates took over {_OUTLIER}x the median "
            f"({typical:.3g} ms) and are left out of the phase means (machine load, a garbage "
            "collection or an epoch start); see step_ms_each"
        )
    counting = not cfg.compile
    reads = HostReads(device)
    with torch.autograd.profiler.profile(use_device="cuda" if on_gpu else None) as prof:
        if counting:
            with reads:
                for _ in range(steps):
                    runner.update(_no_lap)
        else:
            for _ in range(steps):
                runner.update(_no_lap)
    time_key = "self_device_ms" if on_gpu else "self_cpu_ms"
    ops = op_rows(prof.key_averages(), sort_by=time_key, limit=rows)
    device_syncs = None
    if on_gpu:
        names = Counter(e.name for e in prof.function_events)
        total = sum(v for k, v in names.items() if k.startswith("cuda") and "Synchronize" in k)
        device_syncs = total / steps
        notes.append(
            "GPU: each phase ends with torch.cuda.synchronize() so it is charged with its own "
            "kernels; every host read below waits for all queued kernels"
        )
    else:
        notes.append(
            "CPU: ops run synchronously, so host reads cost almost nothing here; they are "
            "counted because each one would be a host-device sync on a GPU"
        )
    sites: list[SyncSite] = []
    syncs: float | None = None
    if counting:
        by_site: dict[str, Counter[str]] = {}
        for (where, what), n in reads.counts.items():
            by_site.setdefault(where, Counter())[what] += n
        sites = [
            SyncSite(where, ", ".join(sorted(c)), sum(c.values()) / steps)
            for where, c in by_site.items()
        ]
        sites.sort(key=lambda s: s.per_step, reverse=True)
        syncs = sum(s.per_step for s in sites)
    else:
        notes.append("compile=true: host reads not counted (counting would change what is traced)")
    return BottleneckReport(
        device=str(device),
        steps=steps,
        step_ms=step_ms,
        phases_ms=phases,
        step_ms_each=totals,
        syncs_per_step=syncs,
        sync_sites=sites,
        device_syncs_per_step=device_syncs,
        top_functions=functions,
        top_ops=ops,
        notes=notes,
        compute_hint=_compute_hint(cfg, len(parts.data.info.input_shape) == 3),
    )

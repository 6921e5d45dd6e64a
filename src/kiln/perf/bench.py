"""Technique ablation: one change at a time against the job as configured, measured in one run.

:func:`ablate` trains the job a config describes for a short, fixed budget of samples, first as
configured (the baseline), then once per variant with one setting changed, and reports for each
run its throughput, step time, peak memory and validation accuracy after the budget, as ratios
to the baseline. Every run goes through the :class:`~kiln.Trainer` (same loader, Engine,
optimizer and callbacks as ``kiln train``), starts from the same seed, and trains on the same
number of samples (``steps`` updates of the baseline's effective batch; a variant with a larger
effective batch takes fewer updates, a fair accuracy comparison).

The variants (:data:`VARIANTS`), each a change to the baseline, and the rules that skip them are
in :mod:`kiln.perf.bench_variants` (re-exported here); :func:`pick_best` picks the row
``kiln bench --apply`` writes. Variants that cannot apply are skipped
with the reason (pin_memory without a GPU, channels_last on flat inputs, compile in a budget
shorter than one compilation). Step time is the median time between updates after ``warmup``;
peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and, on the CPU, model + optimizer
bytes plus the peak allocated during the last update (profiler memory events); accuracy is the
validation metric of the final weights; ratios are medians over repeats of each run against the
baseline of its repeat (see docs/techniques/profile-and-bench.md).

Example:
    >>> from kiln.config import load_config
    >>> result = ablate(load_config("configs/digits_mlp.yaml"),
    ...                 BenchOptions(steps=40, repeats=1))                 # doctest: +SKIP
    >>> [r.name for r in result.rows][:2]                                  # doctest: +SKIP
    ['baseline', 'precision']
    >>> result.row(result.best).overrides                                  # doctest: +SKIP
    ['precision=bf16']
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kiln.config import Config
from kiln.data.base import DataBundle
from kiln.perf.bench_variants import (
    VARIANTS,
    Variant,
    plan_variants,
    set_optimizer_impl,
)
from kiln.perf.measure import (
    cpu_cores,
    cpu_peak_bytes,
    machine_facts,
    measurement_config,
    resident_bytes,
)

__all__ = [
    "VARIANTS",
    "BenchOptions",
    "BenchResult",
    "BenchRow",
    "Measurement",
    "Variant",
    "ablate",
    "pick_best",
    "plan_variants",
    "set_optimizer_impl",
]


# Settings of every measured run: a fixed budget, no mid-run checkpoints or validations (the
# final weights are evaluated once at the end), nothing printed.
_RUN = ("checkpoint.every_epoch=false", "checkpoint.every_n_steps=null", "train.val_every=1000000")


@dataclass(frozen=True)
class BenchOptions:
    """How :func:`ablate` measures.

    Attributes:
        steps: the budget, in optimizer updates of the baseline (samples = steps x its
            effective batch).
        warmup: updates at the start of each run left out of the step time.
        repeats: runs per variant; values are medians.
        variants: names from :data:`VARIANTS` to run (None: all); the baseline always runs.
        tolerance: accuracy drop allowed for ``--apply`` (absolute, 0.01 = 1 point); for a
            loss metric, the relative increase allowed.
        min_speedup: throughput ratio a variant needs to be picked over the baseline.
        compile_min_s: compile is skipped (unless named in ``variants``) when the baseline
            trains the budget in less than this many seconds: compilation alone takes longer.
    """

    steps: int = 60
    warmup: int = 3
    repeats: int = 3
    variants: tuple[str, ...] | None = None
    tolerance: float = 0.01
    min_speedup: float = 1.03
    compile_min_s: float = 30.0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"bench.warmup must be >= 0 updates, got {self.warmup}")
        if self.steps < self.warmup + 3:
            raise ValueError(
                f"bench.steps={self.steps} leaves too few timed updates after "
                f"bench.warmup={self.warmup}; use bench.steps >= {self.warmup + 3}"
            )
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.tolerance < 0:
            raise ValueError(f"bench.tolerance must be >= 0, got {self.tolerance}")
        for name in self.variants or ():
            if name not in VARIANTS:
                from kiln.config import did_you_mean

                raise ValueError(
                    f"unknown bench variant {name!r}; {did_you_mean(name, list(VARIANTS))}"
                    f"allowed: {', '.join(VARIANTS)}"
                )


@dataclass
class Measurement:
    """One training run of one variant."""

    steps: int
    samples_per_step: int
    step_ms: float
    samples_per_s: float
    peak_bytes: int | None
    metric: float | None
    train_s: float


@dataclass
class BenchRow:
    """One variant's line of the table: medians over repeats and ratios to the baseline.

    ``status`` is ``ok``, ``skipped`` or ``failed`` (with ``reason``). Ratios: ``speedup`` is
    throughput over the baseline's (higher is faster; ``speedups`` holds each repeat's),
    ``memory_ratio`` peak memory over the baseline's, ``metric_delta`` the metric minus the
    baseline's. ``consistent`` is False when the repeats disagree on whether the variant is
    faster: the difference is within the machine's noise.
    """

    name: str
    change: str
    overrides: list[str]
    status: str
    reason: str | None = None
    code_change: str | None = None
    steps: int | None = None
    samples_per_s: float | None = None
    step_ms: float | None = None
    peak_mb: float | None = None
    metric: float | None = None
    speedup: float | None = None
    step_ratio: float | None = None
    memory_ratio: float | None = None
    metric_delta: float | None = None
    within_tolerance: bool | None = None
    speedups: list[float] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """Whether every repeat puts the variant on the same side of the baseline."""
        return all(x > 1 for x in self.speedups) or all(x <= 1 for x in self.speedups)


@dataclass
class BenchResult:
    """What :func:`ablate` measured, with the settings that produced it."""

    rows: list[BenchRow]
    metric: str
    higher_is_better: bool
    device: str
    budget_samples: int
    options: BenchOptions
    machine: str
    best: str | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> BenchRow:
        """The row of variant ``name``."""
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready for ``json.dumps``."""
        out = asdict(self)
        out["options"]["variants"] = list(self.options.variants or VARIANTS)
        return out


def pick_best(rows: Sequence[BenchRow], *, min_speedup: float = 1.03) -> BenchRow:
    """The fastest row a config can express whose accuracy is within tolerance.

    A variant must be at least ``min_speedup`` times the baseline's throughput (median over
    repeats) and faster in every repeat to win; else the baseline is the best.

    Example:
        >>> base = BenchRow("baseline", "as configured", [], "ok", speedup=1.0)
        >>> fast = BenchRow("precision", "precision=bf16", ["precision=bf16"], "ok",
        ...                 speedup=1.8, speedups=[1.7, 1.8, 1.9], within_tolerance=True)
        >>> worse = BenchRow("batch_x2", "data.batch_size=128", ["data.batch_size=128"], "ok",
        ...                  speedup=2.5, speedups=[2.5], within_tolerance=False)
        >>> pick_best([base, fast, worse]).name
        'precision'
    """
    baseline = next(r for r in rows if r.name == "baseline")
    fit = [
        r
        for r in rows
        if r.status == "ok"
        and r.name != "baseline"
        and r.code_change is None
        and r.within_tolerance
        and r.speedup is not None
        and all(x > 1 for x in r.speedups)
    ]
    best = max(fit, key=lambda r: r.speedup or 0.0, default=None)
    return best if best is not None and (best.speedup or 0.0) >= min_speedup else baseline


class _Meter:
    """A Trainer callback: the wall time of each update, and the peak memory of the last one."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.intervals: list[float] = []
        self.peak: int | None = None
        self.device = torch.device("cpu")
        self._prof: torch.profiler.profile | None = None
        self._resident = 0
        self._start = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: Any) -> None:
        self.device = trainer.engine.device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = self._now()

    def on_update_end(self, trainer: Any, step: int) -> None:
        self.intervals.append(self._now() - self._start)
        n = len(self.intervals)
        if self.device.type == "cuda" and n == self.steps:
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.device.type == "cpu" and n == self.steps - 1:  # profile the last update
            self._resident = resident_bytes(trainer.engine.model, trainer.optimizer)
            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._prof.start()
        elif self._prof is not None:
            self._prof.stop()
            self.peak = self._resident + cpu_peak_bytes(self._prof)
            self._prof = None
        self._start = self._now()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        if self._prof is not None:
            self._prof.stop()
            self._prof = None


def _metric(result: Any) -> tuple[str, float | None]:
    """The accuracy (or loss) of the final weights: validation split, else test split."""
    metrics = result.val or result.test
    name = "acc" if "acc" in metrics else "loss"
    return name, metrics.get(name)


def _measure(cfg: Config, data: DataBundle, variant: Variant, steps: int, warmup: int) -> Any:
    """Train ``variant`` of ``cfg`` for ``steps`` updates; return a Measurement and the metric."""
    from kiln.train.trainer import Trainer

    run_cfg = measurement_config(cfg, [*variant.overrides, *_RUN, f"train.max_steps={steps}"])
    if run_cfg.compile:
        torch.compiler.reset()  # each run compiles afresh (and stays under the recompile limit)
    meter = _Meter(steps)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as scratch:
        trainer = Trainer(run_cfg, data=data, callbacks=[meter], run_dir=scratch, verbose=False)
        if variant.optimizer is not None:
            set_optimizer_impl(trainer.optimizer, variant.optimizer)
        result = trainer.fit()
    if len(meter.intervals) < steps:
        raise RuntimeError(f"training stopped after {len(meter.intervals)} of {steps} updates")
    samples = run_cfg.data.batch_size * run_cfg.train.accumulate
    step_s = statistics.median(meter.intervals[warmup : steps - 1])
    name, value = _metric(result)
    m = Measurement(
        steps=steps,
        samples_per_step=samples,
        step_ms=step_s * 1e3,
        samples_per_s=samples / step_s,
        peak_bytes=meter.peak,
        metric=value,
        train_s=sum(meter.intervals),
    )
    return m, name


def ablate(
    cfg: Config,
    options: BenchOptions | None = None,
    *,
    data: DataBundle | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure the baseline and each variant of ``cfg`` (see the module docstring).

    Args:
        cfg: the baseline job.
        options: budget, repeats, variants, tolerance.
        data: the data, when already built (else built from ``cfg``, once for all runs).
        progress: called with one line per finished run.

    Returns:
        One row per planned variant (skipped and failed ones included), with the best.

    Raises:
        ValueError: a bad option, or the baseline itself cannot train.

    Example:
        >>> from kiln.config import load_config
        >>> opts = BenchOptions(steps=10, warmup=1, repeats=1, variants=("batch_x2",))
        >>> res = ablate(load_config(None, ["model.kwargs.hidden=[16]"]), opts)  # doctest: +SKIP
        >>> [r.status for r in res.rows]                                         # doctest: +SKIP
        ['ok', 'ok']
    """
    from kiln.train import build
    from kiln.train.engine import select_device
    from kiln.train.trainer import TrainingInterrupted

    options = options or BenchOptions()
    say = progress or (lambda line: None)
    data = data if data is not None else build.build_data_for(cfg)
    device = select_device(cfg.device)
    plan = plan_variants(cfg, data.info, device, options.variants)
    base_samples = cfg.data.batch_size * cfg.train.accumulate
    budget = options.steps * base_samples
    runs: dict[str, list[Measurement]] = {v.name: [] for v in plan}
    skipped = {v.name: v.skip for v in plan if v.skip}
    failed: dict[str, str] = {}
    metric = "acc"
    measured = [v for v in plan if not v.skip]
    for rep in range(options.repeats):
        k = rep % len(measured)  # rotated: each variant takes every position equally often
        for v in measured[k:] + measured[:k]:
            if v.name in failed or v.name in skipped:
                continue
            if v.name == "compile" and rep == 0 and "compile" not in (options.variants or ()):
                base_s = runs["baseline"][0].train_s
                if base_s < options.compile_min_s:
                    skipped[v.name] = (
                        f"the baseline trains the whole budget in {base_s:.1f} s, less than one "
                        "torch.compile compilation takes (tens of seconds on a CPU); name it in "
                        "bench.variants=... to measure it anyway, or raise bench.steps"
                    )
                    continue
            overrides = measurement_config(cfg, v.overrides)
            samples = overrides.data.batch_size * overrides.train.accumulate
            steps = max(options.warmup + 3, round(budget / samples))
            try:
                m, metric = _measure(cfg, data, v, steps, options.warmup)
            except TrainingInterrupted:  # Ctrl-C / SIGTERM: the scratch run is not resumable
                raise KeyboardInterrupt from None
            except Exception as exc:
                if v.name == "baseline":
                    raise
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                failed[v.name] = f"{type(exc).__name__}: {first}"
                say(f"{v.name}: failed ({failed[v.name]})")
                continue
            runs[v.name].append(m)
            shown = "-" if m.metric is None else f"{m.metric:.4f}"
            say(
                f"{v.name} (repeat {rep + 1}/{options.repeats}): {m.samples_per_s:.0f} samples/s, "
                f"{m.step_ms:.2f} ms/update, val {metric} {shown}"
            )
    higher = metric != "loss"
    rows = [_row(v, runs, skipped, failed, options.tolerance, higher) for v in plan]
    result = BenchResult(
        rows=rows,
        metric=metric,
        higher_is_better=higher,
        device=str(device),
        budget_samples=budget,
        options=options,
        machine=machine_facts(device),
    )
    result.best = pick_best(result.rows, min_speedup=options.min_speedup).name
    spread = [m.samples_per_s for m in runs["baseline"]]
    if max(spread) > 1.5 * min(spread):
        result.notes.append(
            f"the baseline's repeats ranged {min(spread):.0f}-{max(spread):.0f} samples/s "
            f"({max(spread) / min(spread):.1f}x): the machine's noise is larger than most "
            "technique effects here; rows whose repeats disagree are marked"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cpu_cores():
        result.notes.append(
            f"the machine was busy (load average {load:.1f} on {cpu_cores()} cores): other "
            "processes shared the CPU, so the ratios are noisy; rerun when it is idle or with "
            "more --repeats"
        )
    return result


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _row(
    v: Variant,
    runs: dict[str, list[Measurement]],
    skipped: dict[str, str],
    failed: dict[str, str],
    tolerance: float,
    higher: bool,
) -> BenchRow:
    code = (
        "optimizer implementation set in code (the config has no switch); not for --apply"
        if v.optimizer
        else None
    )
    row = BenchRow(v.name, v.change, list(v.overrides), "ok", code_change=code)
    if v.name in skipped or v.name in failed:
        row.status = "skipped" if v.name in skipped else "failed"
        row.reason = skipped.get(v.name) or failed.get(v.name)
        return row
    mine, base = runs[v.name], runs["baseline"]
    pairs = list(zip(mine, base, strict=False))  # each run against the baseline of its repeat
    row.steps = mine[0].steps
    row.samples_per_s = _median([m.samples_per_s for m in mine])
    row.step_ms = _median([m.step_ms for m in mine])
    peak = _median([m.peak_bytes for m in mine])
    row.peak_mb = None if peak is None else peak / 2**20
    row.metric = _median([m.metric for m in mine])
    row.speedups = [m.samples_per_s / b.samples_per_s for m, b in pairs]
    row.speedup = _median(row.speedups)
    row.step_ratio = _median([m.step_ms / b.step_ms for m, b in pairs])
    row.memory_ratio = _median(
        [m.peak_bytes / b.peak_bytes for m, b in pairs if m.peak_bytes and b.peak_bytes]
    )
    base_metric = _median([b.metric for b in base])
    if row.metric is not None and base_metric is not None:
        row.metric_delta = row.metric - base_metric
        if higher:
            row.within_tolerance = row.metric_delta >= -tolerance
        else:
            row.within_tolerance = row.metric <= base_metric * (1 + tolerance)
    row.runs = [asdict(m) for m in mine]
    return row

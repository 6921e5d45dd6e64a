"""``kiln profile CONFIG [key.sub=value ...] [profile.<option>=value ...] [--bottleneck]``.

Without ``--bottleneck``: ``torch.profiler`` over ``--steps`` training updates of the job
(:func:`kiln.perf.profile.profile_training`), then the top ops by self time and by memory.
Writes ``trace.json`` (Chrome trace), ``tb/`` (TensorBoard profiler plugin), ``profile.json``
(the tables) and, on a CUDA GPU, ``cuda_memory_snapshot.pickle``.

With ``--bottleneck``: where the time of one update goes (data, to_device, forward, backward,
optimizer, syncs), host reads by call site, and the top cProfile functions and autograd-profiler
ops (:func:`kiln.perf.bottleneck.find_bottleneck`). Writes ``bottleneck.json`` and
``cprofile.pstats``.

Options, taken out of the arguments before the config is loaded: ``profile.wait=1``,
``profile.warmup=1``, ``profile.repeat=1`` (the schedule, with ``--steps`` active updates),
``profile.rows=10`` (rows per table; :class:`kiln.cli.options.ProfileOptions`); with
``--bottleneck``, ``profile.warmup`` is the number
of unmeasured updates before the timed ones (default 3).

Both add a note when torch's intra-op threads outnumber the cores the host's load leaves free
(:mod:`kiln.doctor.threads`): the timings are then the host's, and the note gives the
thread count to use.

The output folder is ``--out`` or ``<out_dir>/<name>-profile/`` (files there are replaced).
Torch is imported inside the functions, so ``kiln --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import EXTRA_ARGS, RUN_OR_CONFIG, Debug, TrustCode

if TYPE_CHECKING:  # torch stays unimported until the verb runs
    from kiln.perf.bottleneck import BottleneckReport
    from kiln.perf.measure import OpRow
    from kiln.perf.profile import ProfileResult


def command(
    args: Annotated[list[str], typer.Argument(help=RUN_OR_CONFIG, show_default=False)],
    bottleneck: Annotated[
        bool, typer.Option("--bottleneck", help="where the time goes: data/fwd/bwd/optim/syncs")
    ] = False,
    steps: Annotated[int, typer.Option(help="active profiled steps")] = 5,
    out: Annotated[str | None, typer.Option(help="folder for the trace and tables")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """torch.profiler over a few training steps: trace, top ops by time and memory."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_profile(
            args, bottleneck=bottleneck, steps=steps, out=out, trust_code=trust_code
        ),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln profile`` to ``app``."""
    app.command("profile", context_settings=EXTRA_ARGS)(command)


def load_job(args: Sequence[str], *, trust_code: bool = False) -> tuple[Any, str | None, list[str]]:
    """The config of ``args`` (CONFIG.yaml or a run directory, then overrides).

    A run directory stands for its resolved ``config.yaml``; a ``model.target`` import path in it
    was written by whoever made the run, so it needs ``trust_code`` (or the user naming it with
    ``model.target=``), as in every verb that reads a run. A config file the user names is theirs.
    Returns the validated config, the config file (None for defaults only) and the overrides.

    Example:
        >>> cfg, path, overrides = load_job(["model.kwargs.hidden=[8]"])
        >>> cfg.model.kwargs, path, overrides
        ({'hidden': [8]}, None, ['model.kwargs.hidden=[8]'])
    """
    from kiln.cli.train import split_args
    from kiln.config import load_config
    from kiln.run import CONFIG

    path, overrides = split_args(list(args))
    run_dir = path is not None and Path(path).is_dir()
    if path is not None and run_dir:
        if not (Path(path) / CONFIG).is_file():
            raise FileNotFoundError(
                f"not a Kiln run directory (no config.yaml): {path}; give a CONFIG.yaml or a run"
            )
        path = str(Path(path) / CONFIG)
    cfg = load_config(path, overrides)
    if run_dir and path is not None:
        from kiln.trust import refuse_file_target

        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("model.target=")]
        refuse_file_target(cfg.model.target, path, trust_code=trust_code, chosen=chosen)
    return cfg, path, overrides


def console() -> Any:
    """A rich console; wide when the output is not a terminal (files, pipes, tests)."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=160)


def _output(cfg: Any, out: str | None, suffix: str) -> Path:
    folder = Path(out) if out else Path(cfg.out_dir) / f"{cfg.name}-{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_profile(
    args: list[str],
    *,
    bottleneck: bool = False,
    steps: int = 5,
    out: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Profile the job in ``args`` (CONFIG then overrides) and print the tables.

    Args:
        args: CONFIG.yaml (or a run directory), then ``key.sub=value`` overrides and
            ``profile.<option>=value``.
        bottleneck: the phase breakdown instead of the op profile.
        steps: active profiled updates (with ``bottleneck``: updates per pass).
        out: output folder (default ``<out_dir>/<name>-profile``).
        trust_code: allow a run directory's ``model.target`` import path (see :mod:`kiln.trust`).

    Returns:
        What was written to ``profile.json`` or ``bottleneck.json``.

    Example:
        >>> run_profile(["configs/digits_mlp.yaml"], steps=3)             # doctest: +SKIP
    """
    # Kineto's start/stop lines on stderr would bury the tables; set before the first profile.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from kiln.cli.options import ProfileOptions, parse_options, take_options

    values, rest = take_options("profile", args)
    opts = parse_options(ProfileOptions, "profile", values).model_dump()
    if steps < 1:
        raise ValueError(f"--steps must be >= 1 update, got {steps}")
    cfg, _, _ = load_job(rest, trust_code=trust_code)
    folder = _output(cfg, out, "profile")
    if bottleneck:
        return _bottleneck(cfg, folder, steps, opts)
    from kiln.perf.profile import Schedule, profile_training

    schedule = Schedule(
        wait=opts["wait"],
        warmup=1 if opts["warmup"] is None else opts["warmup"],
        active=steps,
        repeat=opts["repeat"],
    )
    print(
        f"profiling {schedule.total} updates of {cfg.name} (wait {schedule.wait}, warmup "
        f"{schedule.warmup}, active {schedule.active}, repeat {schedule.repeat})",
        flush=True,
    )
    result = profile_training(cfg, folder, schedule=schedule, rows=opts["rows"])
    _print_profile(result)
    record = result.to_dict()
    (folder / "profile.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {folder / 'profile.json'}")
    return record


def _ops_table(
    rows: Sequence[OpRow], title: str, per_step: int, gpu: bool, memory: bool = True
) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    table.add_column("op", overflow="fold", max_width=60)
    for name in ("calls/step", "self CPU ms", "CPU total ms"):
        table.add_column(name, justify="right")
    if gpu:
        table.add_column("self GPU ms", justify="right")
    if memory:
        table.add_column("self GPU mem KB" if gpu else "self CPU mem KB", justify="right")
    for r in rows:
        cells = [escape(r.name), f"{r.calls / per_step:g}", f"{r.self_cpu_ms / per_step:.3f}"]
        cells.append(f"{r.cpu_total_ms / per_step:.3f}")
        if gpu:
            cells.append(f"{r.self_device_ms / per_step:.3f}")
        mem = r.self_device_mem_bytes if gpu else r.self_cpu_mem_bytes
        if memory:
            cells.append(f"{mem / 1024 / per_step:.1f}")
        table.add_row(*cells)
    return table


def _print_profile(result: ProfileResult) -> None:
    con = console()
    gpu = result.device.startswith("cuda")
    n = result.schedule.active
    unit = "GPU" if gpu else "CPU"
    total = result.self_device_total_ms if gpu else result.self_cpu_total_ms
    con.print(
        _ops_table(result.by_time, f"top ops by self {unit} time, per update ({n} updates)", n, gpu)
    )
    con.print(f"self {unit} time of all ops: {total / n:.3f} ms per update (profiler included)")
    con.print(
        _ops_table(result.by_memory, f"top ops by self {unit} memory (allocated - freed)", n, gpu)
    )
    for note in result.notes:
        print(f"note: {note}")
    print(f"trace: {result.trace}  (chrome://tracing or https://ui.perfetto.dev)")
    print(f"TensorBoard: tensorboard --logdir {result.tb_dir}")
    if result.memory_snapshot is not None:
        print(f"CUDA memory snapshot: {result.memory_snapshot}  (https://pytorch.org/memory_viz)")


def _bottleneck(cfg: Any, folder: Path, steps: int, opts: dict[str, Any]) -> dict[str, Any]:
    from kiln.perf.bottleneck import find_bottleneck

    warmup = 3 if opts["warmup"] is None else opts["warmup"]
    print(
        f"bottleneck of {cfg.name}: {warmup} warm-up updates, then {steps} timed, {steps} under "
        f"cProfile and {steps} under the autograd profiler",
        flush=True,
    )
    from kiln.doctor.threads import host_load, oversubscription_note

    oversubscribed = oversubscription_note(host_load())  # read before the updates add load
    report = find_bottleneck(cfg, steps=steps, warmup=warmup, rows=opts["rows"], out=folder)
    if oversubscribed is not None:
        report.notes.append(oversubscribed)
    _print_bottleneck(report)
    record = report.to_dict()
    (folder / "bottleneck.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {folder / 'bottleneck.json'} and {folder / 'cprofile.pstats'}")
    return record


def _print_bottleneck(report: BottleneckReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    table = Table(title=f"where one update's time goes ({report.device}, {report.steps} updates)")
    for name, justify in (("phase", "left"), ("ms/update", "right"), ("share", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("")
    shares = report.shares
    for phase, ms in report.phases_ms.items():
        bar = "#" * round(shares[phase] * 40)
        table.add_row(phase, f"{ms:.3f}", f"{shares[phase]:.1%}", bar)
    table.add_row("step", f"{report.step_ms:.3f}", "100.0%", "", style="bold")
    con.print(table)
    if report.syncs_per_step is not None:
        sync = Table(title=f"host reads of tensor values: {report.syncs_per_step:g} per update")
        for name in ("call site", "method", "per update"):
            sync.add_column(name)
        for s in report.sync_sites:
            sync.add_row(escape(s.where), s.what, f"{s.per_step:g}")
        con.print(sync)
    if report.device_syncs_per_step is not None:
        con.print(f"cuda*Synchronize calls: {report.device_syncs_per_step:g} per update")
    funcs = Table(title="top Python functions by own time (cProfile), per update")
    for name in ("function", "where", "calls", "own ms", "cumulative ms"):
        funcs.add_column(name, justify="left" if name in ("function", "where") else "right")
    for f in report.top_functions:
        funcs.add_row(
            escape(f.name), f.where, f"{f.calls:g}", f"{f.own_ms:.3f}", f"{f.cumulative_ms:.3f}"
        )
    con.print(funcs)
    gpu = report.device.startswith("cuda")
    unit = "GPU" if gpu else "CPU"
    title = f"top ops by self {unit} time (autograd profiler)"
    con.print(_ops_table(report.top_ops, title, report.steps, gpu, memory=False))
    for note in report.notes:
        print(f"note: {note}")
    print(f"most time: {report.dominant} ({report.shares[report.dominant]:.0%}); {report.hint}")
    sys.stdout.flush()

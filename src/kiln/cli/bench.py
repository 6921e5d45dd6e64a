"""``kiln bench CONFIG [key.sub=value ...] [bench.<option>=value ...] [--apply]``.

Trains the job once as configured and once per technique variant for a short fixed budget
(:func:`kiln.perf.bench.ablate`), then prints a table of throughput, step time, peak memory and
validation accuracy as ratios to the baseline, and writes ``bench.md`` and ``bench.json``.
With ``--apply`` it also writes ``best.yaml``: the config with the fastest variant whose
accuracy is within tolerance (the baseline when none is faster by ``bench.min_speedup``), and
prints its overrides.

Options, taken out of the arguments before the config is loaded (see
:class:`kiln.perf.bench.BenchOptions`): ``bench.steps=60`` (the budget in baseline updates),
``bench.warmup=3``, ``bench.variants=precision,workers`` (a comma list; default all),
``bench.tolerance=0.01``, ``bench.min_speedup=1.03``, ``bench.compile_min_s=30``.

The output folder is ``--out`` or ``<out_dir>/<name>-bench/`` (files there are replaced).
Torch is imported inside the functions, so ``kiln --help`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import EXTRA_ARGS, RUN_OR_CONFIG, Debug, TrustCode
from kiln.cli.profile import console, load_job

if TYPE_CHECKING:  # torch stays unimported until the verb runs
    from kiln.perf.bench import BenchResult, BenchRow


def command(
    args: Annotated[list[str], typer.Argument(help=RUN_OR_CONFIG, show_default=False)],
    apply: Annotated[
        bool, typer.Option("--apply", help="write the fastest config within accuracy tolerance")
    ] = False,
    repeats: Annotated[int, typer.Option(help="repeats per variant (median)")] = 3,
    out: Annotated[str | None, typer.Option(help="folder for the table and JSON")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Technique ablation: time, memory and accuracy of one change at a time vs a baseline."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_bench(args, apply=apply, repeats=repeats, out=out, trust_code=trust_code),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln bench`` to ``app``."""
    app.command("bench", context_settings=EXTRA_ARGS)(command)


def run_bench(
    args: list[str],
    *,
    apply: bool = False,
    repeats: int = 3,
    out: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Run the ablation of the job in ``args`` (CONFIG then overrides) and print the table.

    Args:
        args: CONFIG.yaml (or a run directory), then ``key.sub=value`` overrides and
            ``bench.<option>=value``.
        apply: write ``best.yaml`` with the fastest config within the accuracy tolerance.
        repeats: runs per variant (medians are reported).
        out: output folder (default ``<out_dir>/<name>-bench``).
        trust_code: allow a run directory's ``model.target`` import path (see :mod:`kiln.trust`).

    Returns:
        What was written to ``bench.json``.

    Example:
        >>> run_bench(["configs/digits_mlp.yaml", "bench.variants=precision"],
        ...           repeats=1, apply=True)                              # doctest: +SKIP
    """
    # Kineto's start/stop lines on stderr (one pair per memory profile) would bury the table.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from kiln.cli.options import BenchCliOptions, parse_options, take_options
    from kiln.config import dump_config, load_config
    from kiln.perf.bench import BenchOptions, ablate

    values, rest = take_options("bench", args)
    # Only the options given: BenchOptions holds the defaults.
    opts = parse_options(BenchCliOptions, "bench", values).model_dump(exclude_unset=True)
    names = opts.pop("variants", None)
    variants = tuple(n.strip() for n in names.split(",") if n.strip()) if names else None
    options = BenchOptions(repeats=repeats, variants=variants, **opts)
    cfg, path, overrides = load_job(rest, trust_code=trust_code)
    folder = Path(out) if out else Path(cfg.out_dir) / f"{cfg.name}-bench"
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"bench {cfg.name}: {options.steps} baseline updates per run "
        f"({options.steps * cfg.data.batch_size * cfg.train.accumulate} samples), "
        f"{options.repeats} repeat(s)",
        flush=True,
    )
    result = ablate(cfg, options, progress=lambda line: print("  " + line, flush=True))
    print_table(result)
    record = result.to_dict()
    (folder / "bench.md").write_text(markdown(result) + "\n")
    (folder / "bench.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {folder / 'bench.md'} and {folder / 'bench.json'}")
    if apply:
        best = result.row(result.best or "baseline")
        target = folder / "best.yaml"
        target.write_text(dump_config(load_config(path, [*overrides, *best.overrides])))
        record["applied"] = {"variant": best.name, "overrides": best.overrides, "file": str(target)}
        (folder / "bench.json").write_text(json.dumps(record, indent=1))
        if best.name == "baseline":
            print(
                f"--apply: no variant was {options.min_speedup:g}x faster (and faster in every "
                f"repeat) within the tolerance; wrote the baseline config to {target}"
            )
        else:
            shown = " ".join(best.overrides)
            print(
                f"--apply: {best.name} is the fastest within tolerance ({best.speedup:.2f}x "
                f"throughput, val {result.metric} {_delta(best)}); overrides: {shown}"
            )
            print(f"wrote {target}; train it with: kiln train {target}")
    return record


def _delta(row: BenchRow) -> str:
    d = row.metric_delta
    return "-" if d is None else f"{d:+.4f}"


def format_row(r: BenchRow, result: BenchResult) -> list[str]:
    """The cells of one row as text (for the terminal table and the markdown).

    Example:
        >>> from kiln.perf.bench import BenchRow
        >>> r = BenchRow("pin_memory", "data.pin_memory=true", [], "skipped", reason="no GPU")
        >>> format_row(r, None)[-1]
        'skipped: no GPU'
    """

    def num(v: float | None, fmt: str, unit: str = "") -> str:
        return "-" if v is None else format(v, fmt) + unit

    if r.status != "ok":
        return [r.name, r.change, *["-"] * 7, f"{r.status}: {r.reason}"]
    notes = []
    if r.name == result.best and r.name != "baseline":
        notes.append("best within tolerance")
    elif r.within_tolerance is False:
        notes.append("outside tolerance")
    if not r.consistent:
        lo, hi = min(r.speedups), max(r.speedups)
        notes.append(f"repeats disagree ({lo:.2f}x-{hi:.2f}x)")
    if r.code_change:
        notes.append("set in code, not for --apply")
    return [
        r.name,
        r.change,
        num(r.samples_per_s, ".0f"),
        num(r.speedup, ".2f", "x"),
        num(r.step_ms, ".2f"),
        num(r.peak_mb, ".2f"),
        num(r.memory_ratio, ".2f", "x"),
        num(r.metric, ".4f"),
        _delta(r),
        "; ".join(notes),
    ]


_COLUMNS = ("variant", "change", "samples/s", "speedup", "step ms", "peak MB", "memory")


def _header(result: BenchResult) -> str:
    o = result.options
    return (
        f"Budget: {result.budget_samples} samples ({o.steps} baseline updates; the first "
        f"{o.warmup} of each run are not timed), median of {o.repeats} repeat(s); device "
        f"{result.device}; {result.machine}. Peak memory: "
        + (
            "torch.cuda.max_memory_allocated."
            if result.device.startswith("cuda")
            else "model + optimizer bytes plus the peak allocated during one update "
            "(torch.profiler memory events)."
        )
    )


def markdown(result: BenchResult) -> str:
    """The table as GitHub markdown, with the measurement settings above it.

    Example:
        >>> print(markdown(result))                                     # doctest: +SKIP
    """
    cols = [*_COLUMNS, f"val {result.metric}", "delta", "note"]
    lines = [_header(result), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_row(r, result)) + " |" for r in result.rows]
    lines += [f"\nNote: {note}" for note in result.notes]
    return "\n".join(lines)


def print_table(result: BenchResult) -> None:
    """The table on the terminal (rich), with the settings under it."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="technique ablation: one change at a time vs the baseline")
    for name in [*_COLUMNS, f"val {result.metric}", "delta", "note"]:
        right = name not in ("variant", "change", "note")
        table.add_column(name, justify="right" if right else "left", overflow="fold")
    for r in result.rows:
        style = "dim" if r.status != "ok" else "bold green" if r.name == result.best else None
        table.add_row(*[escape(c) for c in format_row(r, result)], style=style)
    con = console()
    con.print(table)
    con.print(escape(_header(result)), highlight=False)
    for note in result.notes:
        print(f"note: {note}")

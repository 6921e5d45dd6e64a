"""Claim: Kiln's Trainer costs <= 1.03x, the Engine <= 1.02x, a same-kernel PyTorch loop per step.

Same model, data, seed, number of optimizer steps, SGD (lr 0.05, momentum 0.9), batch 64, fp32,
one torch thread; each measurement in its own process pinned to one core. Every ratio is printed
against both baselines: ``raw`` (the loop guides teach) and ``raw_fused`` (the same kernels and
data path as Kiln, so the ratio is Kiln's own Python). Two cases:

* ``mlp``: MLP 64-256-256-10 on digits 8x8 (standardised): compute-bound;
* ``linear``: Linear(64, 10) on the same data: overhead-bound (most of a step is Python).

Loops compared (``--loops``):

* ``raw``: the loop PyTorch guides teach: ``TensorDataset`` + ``DataLoader(shuffle=True)``
  (per-sample indexing + ``default_collate``), ``torch.optim.SGD`` with its default
  implementation (CPU: a per-parameter for-loop). The first baseline.
* ``raw_gather``: the same loop, batches gathered with one index op per batch
  (``perm = randperm(n)``; ``x[perm[i:i+64]]``), which is what Kiln's loader does for in-memory
  data (``ArrayDataset.__getitems__`` + a pass-through collate).
* ``raw_fused``: ``raw_gather`` plus ``SGD(fused=True)``, the optimizer kernel Kiln picks
  (``kiln.train.optim.build_optimizer``). Same kernels as Kiln: the difference is Kiln's Python.
  The second baseline, the one the targets are stated against.
* ``kiln``: ``kiln.Trainer(cfg, model=..., data=DataBundle(ArrayDataset(x, y), None, None, info))``
  (Kiln's built-in in-memory data) with no validation, test split, checkpoints, TensorBoard or
  progress bar in the loop, ``train.log_every`` larger than the run (no ``.item()``), and the
  default non-finite guard (``train.nonfinite=stop``) on. ``kiln_unguarded`` (only when named in
  ``--loops``): the same with ``train.nonfinite=ignore``, which prices the guard.
* ``fit_tensor``: ``kiln.fit(model=..., data=TensorDataset(x, y), config=...)``: the user's own
  dataset, same settings as ``kiln`` (``data.val_fraction=0 data.test_fraction=0``).
* ``engine``: ``kiln.Engine`` in a user's loop (``to_device``, ``micro_step``, ``autocast``,
  ``backward``, ``optimizer_step``), the ``raw_fused`` data path and optimizer; no guard.
* ``lightning``: ``lightning.Trainer`` (logger, checkpointing, progress bar, model summary and
  sanity validation off; cpu, 1 device) over the ``raw`` DataLoader and default SGD.
* ``lightning_fused``: the same Trainer on the ``raw_fused`` basis: batches gathered with one index
  op per batch and ``SGD(fused=True)``. Both Lightning loops run only when ``import lightning``
  works in this interpreter or in ``--lightning-python`` (default ``.venv-bench/bin/python``);
  see benchmarks/README.md for the separate venv.

What is timed: wall time from the end of the first epoch's last update to the end of the last
update, divided by the updates in between (the first epoch is a warm-up). That covers whole
epochs, including every epoch boundary (sampler reset, Kiln's per-epoch metrics line), and
excludes process start, imports, setup and everything after the last update (Kiln's final
save). Kiln and Lightning are timed by a callback (``on_update_end`` / ``on_train_batch_end``)
that only compares the step counter and reads the clock twice.

Run:  .venv/bin/python benchmarks/loop_overhead.py            (about 5 minutes; --isolate: 8)
      .venv/bin/python benchmarks/loop_overhead.py --quick    (smoke test, < 30 s, in-process)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from _overhead_loops import (
    BASELINES,
    BATCH,
    CASES,
    DEFAULT_EPOCHS,
    LIGHTNING,
    LIGHTNING_HINT,
    LOOPS,
    LR,
    MOMENTUM,
    TARGETS,
    make_digits,
    measure,
    measure_sliced,
)

# ---------------------------------------------------------------------------- orchestration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny, in-process, < 30 s")
    ap.add_argument(
        "--mode",
        choices=("slices", "processes"),
        default="slices",
        help="slices (default): all loops in one pinned process, taking turns one epoch at a "
        "time, ratios per round (robust on a loaded machine); processes: one process per loop "
        "and repetition",
    )
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="slices mode: time each slice by the loop thread's CPU time (default: robust to "
        "other processes taking the core) or by wall time",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions: processes (slices mode, default 3) or interleaved runs (default 5)",
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--epochs-mlp", type=int, default=DEFAULT_EPOCHS["mlp"])
    ap.add_argument("--epochs-linear", type=int, default=DEFAULT_EPOCHS["linear"])
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--lightning-python",
        default=str(C.ROOT / ".venv-bench" / "bin" / "python"),
        help="interpreter with lightning installed (used when this one lacks it)",
    )
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="one process per (loop, case) measurement (default: one per loop and repetition, "
        "measuring both cases; halves the run time)",
    )
    ap.add_argument("--worker", metavar="LOOP", help=argparse.SUPPRESS)
    ap.add_argument("--worker-sliced", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()

    epochs = {"mlp": args.epochs_mlp, "linear": args.epochs_linear}
    if args.worker_sliced:
        loops_ = [lp for lp in args.loops.split(",") if lp]
        C.emit(
            [
                res
                for case in args.cases.split(",")
                for res in measure_sliced(
                    loops_, case, epochs[case], Path(args.data), args.threads, args.clock
                )
            ]
        )
        return
    if args.worker:
        C.emit(
            [
                measure(args.worker, case, epochs[case], Path(args.data), args.threads)
                for case in args.cases.split(",")
            ]
        )
        return

    cases = [c for c in args.cases.split(",") if c]
    loops = [lp for lp in args.loops.split(",") if lp]
    sliced = args.mode == "slices"
    reps = args.reps if args.reps is not None else (3 if sliced else 5)
    pin = C.pin_prefix(args.cpu)
    lightning_py: str | None = None
    notes: list[str] = []
    wanted_lightning = [lp for lp in loops if lp in LIGHTNING]
    if args.quick:
        epochs = {"mlp": 3, "linear": 3}
        reps = 1
        pin = []
        if wanted_lightning:
            loops = [lp for lp in loops if lp not in LIGHTNING]
            notes.append("lightning: skipped in --quick (its import alone takes several seconds)")
    elif wanted_lightning:
        lightning_py = C.python_for("lightning", [args.lightning_python])
        if lightning_py is None:
            loops = [lp for lp in loops if lp not in LIGHTNING]
            notes.append(f"lightning: not installed; to include it run: {LIGHTNING_HINT}")
        else:
            notes.append(f"lightning: measured with {lightning_py}")

    print("# Loop overhead: time per optimizer step, Kiln vs hand-written PyTorch loops")
    print(
        C.machine_facts(
            args.threads, C.describe_pin(pin, "--quick" if args.quick else "taskset unavailable")
        )
    )
    print(
        f"digits 8x8 standardised (1797 rows, 29 updates/epoch), batch {BATCH}, SGD lr {LR} "
        f"momentum {MOMENTUM}, fp32; epochs {epochs} (first epoch = warm-up, not timed); "
        + (
            f"{reps} process(es), each running every loop in turns of one epoch (a round: one "
            "epoch of each loop, order rotated per round); ratios per round; clock: "
            + ("the loop thread's CPU time" if args.clock == "cpu" else "wall time")
            if sliced
            else f"{reps} interleaved repetition(s); "
            + (
                "--quick: all in this process"
                if args.quick
                else "one process per measurement"
                if args.isolate
                else "one process per loop and repetition (measures all its cases)"
            )
        )
    )
    for note in notes:
        print(note)
    sys.stdout.flush()

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        data = Path(tmp) / "digits.pt"
        make_digits(data)
        env = C.single_thread_env(args.threads)
        t_start = time.perf_counter()
        for rep in range(reps if sliced else 0):
            order = C.interleaved(cases, rep)
            if args.quick:
                out = [
                    r
                    for c in order
                    for r in measure_sliced(loops, c, epochs[c], data, args.threads, args.clock)
                ]
            else:
                cmd = [
                    *pin,
                    lightning_py or sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker-sliced",
                    "--loops",
                    ",".join(C.interleaved(loops, rep)),
                    "--cases",
                    ",".join(order),
                    "--epochs-mlp",
                    str(epochs["mlp"]),
                    "--epochs-linear",
                    str(epochs["linear"]),
                    "--data",
                    str(data),
                    "--threads",
                    str(args.threads),
                    "--clock",
                    args.clock,
                ]
                out = C.run_child(cmd, env=env, timeout=1800)
            for res in out:
                rounds = [
                    {"us_per_step": us, **{k: res[k] for k in ("final_loss", "steps_timed")}}
                    for us in res["rounds"]
                ]
                results.setdefault((res["case"], res["loop"]), []).extend(rounds)
            took = time.perf_counter() - t_start
            print(f"  process {rep + 1}/{reps} done ({took:.0f} s)", flush=True)
        for rep in range(0 if sliced else reps):
            # Both orders of the cases, every loop in every position: no one gets a lucky slot.
            order = C.interleaved(cases, rep)
            groups = [[c] for c in order] if (args.isolate or args.quick) else [order]
            for group in groups:
                for loop in C.interleaved(loops, rep):
                    if args.quick:
                        out = [measure(loop, c, epochs[c], data, args.threads) for c in group]
                    else:
                        exe = lightning_py if loop in LIGHTNING else sys.executable
                        cmd = [
                            *pin,
                            exe or sys.executable,
                            str(Path(__file__).resolve()),
                            "--worker",
                            loop,
                            "--cases",
                            ",".join(group),
                            "--epochs-mlp",
                            str(epochs["mlp"]),
                            "--epochs-linear",
                            str(epochs["linear"]),
                            "--data",
                            str(data),
                            "--threads",
                            str(args.threads),
                        ]
                        out = C.run_child(cmd, env=env)
                    for res in out:
                        results.setdefault((res["case"], loop), []).append(res)
            took = time.perf_counter() - t_start
            print(f"  rep {rep + 1}/{reps} done ({took:.0f} s)", flush=True)

    if args.json:
        Path(args.json).write_text(
            json.dumps({f"{c}/{lp}": v for (c, lp), v in results.items()}, indent=1)
        )
    report(results, cases, loops, reps, sliced)


def ratios(
    results: dict[tuple[str, str], list[dict[str, Any]]], case: str, loop: str, base: str
) -> list[float]:
    """Per repetition: loop's us/step over the baseline's from the same repetition."""
    if (case, base) not in results:
        return []
    pairs = zip(results[(case, loop)], results[(case, base)], strict=True)
    return [a["us_per_step"] / b["us_per_step"] for a, b in pairs]


def report(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    cases: list[str],
    loops: list[str],
    reps: int,
    sliced: bool = False,
) -> None:
    """Per case: median us/step, spread, and median per-repetition ratios to raw and raw_fused.

    Sliced: every entry is one round (one epoch of each loop, back to back) and the spread is
    the interquartile range over rounds; else one entry per repetition and the min-max.
    """
    spread = quartiles if sliced else C.spread
    what = "p25-p75" if sliced else "min-max"
    for case in cases:
        print(f"\n## {case}: " + ("MLP 64-256-256-10" if case == "mlp" else "Linear(64, 10)"))
        rows = []
        for loop in loops:
            runs = results[(case, loop)]
            us = [r["us_per_step"] for r in runs]
            cells = []
            for base in BASELINES:
                rs = ratios(results, case, loop, base)
                cells.append(f"{C.median(rs):.3f} ({spread(rs)})" if rs else "-")
            loss = C.median([r["final_loss"] for r in runs])
            rows.append(
                [
                    loop,
                    f"{C.median(us):.0f}",
                    spread(us),
                    *cells,
                    f"{loss:.4f}",
                    runs[0]["steps_timed"],
                ]
            )
        headers = [
            "loop",
            "us/step (median)",
            f"us/step {what}",
            f"ratio to raw ({what})",
            f"ratio to raw_fused ({what})",
            "final train loss",
            "updates timed",
        ]
        print(C.table(headers, rows))
    unit = f"{len(next(iter(results.values())))} rounds" if sliced else "repetitions"
    print(
        f"\nRatios: median over {unit} of (loop / baseline from the same "
        f"{'round' if sliced else 'repetition'}). Final train loss: loss on all rows after "
        "training (same work gives close values; shuffles differ between loops)."
    )
    for loop, limit in TARGETS.items():
        for case in cases:
            rs = ratios(results, case, loop, "raw_fused") if (case, loop) in results else []
            if rs:
                r = C.median(rs)
                verdict = "PASS" if r <= limit else "FAIL"
                print(
                    f"target {loop} <= {limit:.2f}x raw_fused, {case}: {r:.3f}x "
                    f"({what} {spread(rs)}) -> {verdict}"
                )
    if reps < (3 if sliced else 5):
        print(f"(only {reps} repetition(s): a smoke test, not a measurement)")


def quartiles(xs: list[float]) -> str:
    """``p25-p75`` of many rounds (min-max of hundreds of rounds is mostly the outliers)."""
    if len(xs) < 4:
        return C.spread(xs)
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.3g}-{q[2]:.3g}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

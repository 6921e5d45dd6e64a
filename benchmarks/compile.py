"""Claim: ``torch.compile`` makes the default ResNet's train step faster on CPU; its one-time cold
compile costs seconds, reported apart.

Model: Kiln's ResNet as the default job builds it (``build_resnet`` for 1x32x32 digits-like
images, 10 classes: depths (1, 1, 1), width 16), batch 64 of random 1x32x32 inputs, SGD lr 0.01,
``--precision`` fp32 (default) or bf16 autocast, one torch thread. Compared in the same process,
from the same initial weights:

* ``eager``: the model as is (the baseline of every ratio);
* ``compiled``: ``torch.compile(model)`` (inductor, default mode) on a deep copy; the optimizer
  step stays eager in both.

What is timed: a train step (forward, loss, backward, SGD step, zero_grad). Eager and compiled
steps run in alternating blocks (``--blocks`` blocks of ``--steps`` steps each) after warm-up,
so load bursts hit both alike; each mode's step time is the median over its steps, and the
ratio is compiled / eager. **Cold compile** is the wall time of the first compiled step (Dynamo
tracing plus Inductor code generation and C++ compilation for forward and backward) minus a
compiled step, with an empty Inductor cache: every repetition runs in a fresh process with its
own new ``TORCHINDUCTOR_CACHE_DIR``. The process compiles on every core it may use (as a
training run would; Inductor compiles in a pool of worker processes), then pins itself to one
core (``--cpu``) for the timed steps. After the repetitions one more process reuses the last
cache to show the **warm-cache** compile (the second run of the same job). The first-step
losses of the two modes are compared as a parity check.

Run:  .venv/bin/python benchmarks/compile.py                  (about 3.5 minutes)
      .venv/bin/python benchmarks/compile.py --quick          (smoke test, < 30 s, in-process;
                                                               backend aot_eager: no Inductor)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

BATCH = 64


def build(quick: bool) -> tuple[Any, Any, Any]:
    """The default job's ResNet (seeded) and one digits-like batch."""
    import torch

    from kiln.data.base import DataInfo
    from kiln.models.resnet import build_resnet

    torch.manual_seed(0)
    if quick:
        info = DataInfo("classification", (1, 8, 8), num_classes=10)
        model = build_resnet(info, depths=(1,), width=4)
        x = torch.randn(8, 1, 8, 8)
    else:
        info = DataInfo("classification", (1, 32, 32), num_classes=10)
        model = build_resnet(info)  # the builder defaults: depths (1, 1, 1), width 16
        x = torch.randn(BATCH, 1, 32, 32)
    return model, x, torch.randint(0, 10, (x.shape[0],))


def measure(
    steps: int, blocks: int, threads: int, precision: str, backend: str, quick: bool, cpu: int = -1
) -> dict[str, Any]:
    """One repetition: cold (or warm-cache) compile, then alternating timed blocks on ``cpu``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    eager, x, y = build(quick)
    compiled_base = copy.deepcopy(eager)
    compiled = torch.compile(compiled_base, backend=backend)
    opts = {
        "eager": torch.optim.SGD(eager.parameters(), lr=0.01),
        "compiled": torch.optim.SGD(compiled_base.parameters(), lr=0.01),
    }
    models = {"eager": eager, "compiled": compiled}

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(mode: str) -> float:
        with autocast():
            loss = F.cross_entropy(models[mode](x), y)
        loss.backward()
        opts[mode].step()
        opts[mode].zero_grad(set_to_none=True)
        return float(loss.detach())

    loss_eager = step("eager")
    t0 = time.perf_counter()
    loss_compiled = step("compiled")  # compiles forward and backward
    first_compiled_s = time.perf_counter() - t0
    if cpu >= 0 and hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})  # compiled on all cores; timed on one
    for mode in ("eager", "compiled"):  # warm-up after compiling
        step(mode)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for b in range(blocks):
        for mode in ("eager", "compiled") if b % 2 == 0 else ("compiled", "eager"):
            for _ in range(steps):
                t = time.perf_counter()
                step(mode)
                times[mode].append(time.perf_counter() - t)
    ms = {m: 1e3 * C.median(v) for m, v in times.items()}
    return {
        "ms_eager": ms["eager"],
        "ms_compiled": ms["compiled"],
        "ratio": ms["compiled"] / ms["eager"],
        "first_compiled_s": first_compiled_s,
        "compile_s": first_compiled_s - ms["compiled"] / 1e3,
        "first_loss_diff": abs(loss_eager - loss_compiled),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny, aot_eager, < 30 s")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, each a cold compile")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per mode")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    backend = "aot_eager" if args.quick else "inductor"
    if args.worker:
        C.emit(
            measure(args.steps, args.blocks, args.threads, args.precision, backend, False, args.cpu)
        )
        return

    reps, steps, blocks = args.reps, args.steps, args.blocks
    pinned = bool(C.pin_prefix(args.cpu)) and not args.quick
    if args.quick:
        reps, steps, blocks = 1, 2, 2
    print("# torch.compile: train-step time of the default ResNet, compiled vs eager")
    print(
        C.machine_facts(
            args.threads,
            f"compile on all allowed cores, then timed steps on core {args.cpu}"
            if pinned
            else "none",
        )
    )
    shape = (
        "tiny ResNet depths (1,) width 4, 1x8x8, batch 8"
        if args.quick
        else f"ResNet depths (1,1,1) width 16, 1x32x32, batch {BATCH}"
    )
    print(
        f"{shape}, {args.precision}, SGD; "
        f"backend {backend}; {blocks} alternating blocks of {steps} steps per mode; {reps} "
        "repetition(s), "
        + ("--quick: tiny model, in this process" if args.quick else "each a fresh process")
    )
    sys.stdout.flush()

    runs: list[dict[str, Any]] = []
    warm: dict[str, Any] | None = None
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-inductor-") as tmp:
        if args.quick:
            runs.append(measure(steps, blocks, args.threads, args.precision, backend, True))
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
            cmd += ["--cpu", str(args.cpu if pinned else -1)]
            cmd += ["--steps", str(steps), "--blocks", str(blocks)]
            cmd += ["--threads", str(args.threads), "--precision", args.precision]
            env = C.single_thread_env(args.threads)
            for rep in range(reps):
                env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, f"rep{rep}")  # cold
                runs.append(C.run_child(cmd, env=env))
                took = time.perf_counter() - t_start
                print(f"  rep {rep + 1}/{reps} done ({took:.0f} s)", flush=True)
            warm = C.run_child(cmd, env=env)  # the last repetition's cache: warm
            print(f"  warm-cache run done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"cold": runs, "warm": warm}, indent=1))
    report(runs, warm, args.quick)


def report(runs: list[dict[str, Any]], warm: dict[str, Any] | None, quick: bool) -> None:
    def col(key: str) -> list[float]:
        return [r[key] for r in runs]

    ratio = C.median(col("ratio"))
    rows = [
        ["eager", f"{C.median(col('ms_eager')):.1f}", C.spread(col("ms_eager")), "1.000", "-"],
        [
            "compiled",
            f"{C.median(col('ms_compiled')):.1f}",
            C.spread(col("ms_compiled")),
            f"{ratio:.3f} ({C.spread(col('ratio'))})",
            f"{1 / ratio:.2f}x",
        ],
    ]
    headers = ["mode", "ms/step (median)", "ms/step min-max", "step time ratio (min-max)", "speed"]
    print()
    print(C.table(headers, rows))
    compile_rows = [
        [
            "cold (empty cache)",
            f"{C.median(col('compile_s')):.1f}",
            C.spread(col("compile_s")),
            len(runs),
        ]
    ]
    if warm is not None:
        compile_rows.append(["warm (reused cache)", f"{warm['compile_s']:.1f}", "-", 1])
    print()
    print(C.table(["compile", "s (median)", "s min-max", "runs"], compile_rows))
    diff = max(col("first_loss_diff"))
    print(
        f"\nRatio: compiled / eager step time, median over repetitions (each from blocks "
        f"alternating in one process). Compile: first compiled step minus a compiled step. "
        f"Parity: first-step loss |eager - compiled| <= {diff:.1e}."
    )
    if quick:
        print(
            "--quick: tiny model with backend aot_eager; the numbers above are not a measurement."
        )
    else:
        steps_to_repay = C.median(
            [r["compile_s"] / max(1e-9, (r["ms_eager"] - r["ms_compiled"]) / 1e3) for r in runs]
        )
        if ratio < 1:
            print(f"The cold compile is repaid after about {steps_to_repay:.0f} steps.")
        else:
            print("Compiled steps are not faster here: compiling does not pay off.")


if __name__ == "__main__":
    main()

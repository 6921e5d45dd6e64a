"""Claim: activation checkpointing cuts peak activation memory >= 50% at <= 1.35x step time.

``apply_activation_checkpointing(model)``
(:mod:`kiln.algorithms.activation_checkpointing`) with its default blocks (``ckpt``), against
the same model without it (``plain``): same initial weights, same batch, fp32, SGD (lr 0.01),
one torch thread, each process pinned to one core. Cases:

* ``mlp``: MLP 256 -> 16 x 256 -> 10 with LayerNorm + GELU in each hidden layer, batch 1024;
  one checkpoint per hidden layer (Linear, LayerNorm, GELU);
* ``mlp_relu``: the same MLP with ReLU and no norm, the control: per-layer checkpointing cannot
  save anything there (ReLU saves its output, which is also the next Linear's saved input, and
  the checkpoint keeps exactly that tensor);
* ``resnet``: Kiln's ResNet, depths (3, 3, 3), width 16 (ResNet-20-like), 1x32x32 inputs, batch
  64; one checkpoint per BasicBlock (9).

What is measured:

* **peak activation memory** (the claim): the peak of live tensor bytes during one forward +
  backward above the level before it, with the gradients already allocated (a previous
  backward; ``zero_grad(set_to_none=False)``), so it counts activations and autograd
  temporaries, not gradients. From the allocation and free events that
  ``torch.profiler(profile_memory=True)`` records in order: exact, identical on every run.
* **peak RSS growth**: in a separate process per mode, the growth of the process's peak resident
  set (VmHWM, reset through ``/proc/self/clear_refs`` just before the first step) over 3 whole
  steps (gradients and optimizer included), with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
  activations go back to the OS instead of staying in glibc's free lists. A cross-check at the
  level the OS sees.
* **step time** (forward, loss, backward, SGD step, zero_grad): plain and ckpt models in the
  same process, in alternating blocks of ``--steps`` steps (``--blocks`` per mode, order
  flipped every block) after warm-up, so load bursts from other processes hit both alike;
  median per mode, ratio ckpt / plain per repetition, median over repetitions.

Run:  .venv/bin/python benchmarks/checkpointing.py            (about 6 minutes)
      .venv/bin/python benchmarks/checkpointing.py --quick    (smoke test, < 30 s, in-process)
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CASES = ("mlp", "mlp_relu", "resnet")
MODES = ("plain", "ckpt")
TARGET_MEMORY_CUT, TARGET_TIME_RATIO = 0.50, 1.35
DESCRIPTIONS = {
    "mlp": "MLP 256-16x256-10, LayerNorm + GELU, batch 1024",
    "mlp_relu": "MLP 256-16x256-10, ReLU, no norm, batch 1024 (control)",
    "resnet": "ResNet depths (3,3,3) width 16, 1x32x32, batch 64",
}


def build(case: str, mode: str, quick: bool) -> tuple[Any, Any, Any]:
    """The model (seeded: the same weights in every process and mode) and one batch."""
    import torch

    from kiln.algorithms.activation_checkpointing import apply_activation_checkpointing
    from kiln.models import MLP, ResNet

    torch.manual_seed(0)
    model: Any
    if case in ("mlp", "mlp_relu"):
        width, depth, batch = (32, 4, 16) if quick else (256, 16, 1024)
        kind: dict[str, Any] = {"activation": "gelu", "norm": "layer"} if case == "mlp" else {}
        model = MLP(256, 10, hidden=(width,) * depth, **kind)
        x = torch.randn(batch, 256)
    elif case == "resnet":
        depths, width, batch = ((1, 1), 4, 4) if quick else ((3, 3, 3), 16, 64)
        model = ResNet(num_classes=10, in_channels=1, depths=depths, width=width)
        x = torch.randn(batch, 1, 32, 32)
    else:
        raise ValueError(f"unknown case {case!r}; allowed: {', '.join(CASES)}")
    if mode == "ckpt":
        apply_activation_checkpointing(model)
    return model.train(), x, torch.randint(0, 10, (x.shape[0],))


def activation_peak(model: Any, x: Any, y: Any) -> int:
    """Peak live bytes of one forward + backward above its start, gradients pre-allocated."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    F.cross_entropy(model(x), y).backward()  # allocates every .grad
    model.zero_grad(set_to_none=False)  # keep them: the next backward accumulates in place
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        F.cross_entropy(model(x), y).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak


def make_step(model: Any, x: Any, y: Any) -> Any:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_time(case: str, steps: int, blocks: int, quick: bool) -> dict[str, Any]:
    """Plain and ckpt step times, alternating in this process, and their activation peaks."""
    import torch

    from kiln.algorithms.activation_checkpointing import apply_activation_checkpointing

    model, x, y = build(case, "plain", quick)
    ckpt = copy.deepcopy(model)
    units = apply_activation_checkpointing(ckpt)
    models = {"plain": model, "ckpt": ckpt}
    step_fns = {mode: make_step(m, x, y) for mode, m in models.items()}
    peaks = {mode: activation_peak(m, x, y) for mode, m in models.items()}
    for fn in step_fns.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for b in range(blocks):
        for mode in MODES if b % 2 == 0 else MODES[::-1]:
            for _ in range(steps):
                t0 = time.perf_counter()
                step_fns[mode]()
                times[mode].append(time.perf_counter() - t0)
    return {
        "case": case,
        "units": len(units),
        "ms_plain": 1e3 * C.median(times["plain"]),
        "ms_ckpt": 1e3 * C.median(times["ckpt"]),
        "peak_plain": peaks["plain"],
        "peak_ckpt": peaks["ckpt"],
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
    }


def _vm_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def measure_rss(case: str, mode: str, quick: bool) -> dict[str, Any]:
    """Peak RSS growth over 3 train steps of one model (run it in a fresh process)."""
    model, x, y = build(case, mode, quick)
    step = make_step(model, x, y)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return {"case": case, "mode": mode, "rss_growth": None}
    before = _vm_kib("VmRSS")
    for _ in range(3):
        step()
    peak = _vm_kib("VmHWM")
    growth = (peak - before) * 1024 if peak is not None and before is not None else None
    return {"case": case, "mode": mode, "rss_growth": growth}


# ---------------------------------------------------------------------------- orchestration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny, in-process, < 30 s")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per mode")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--worker", metavar="KIND/CASE[/MODE]", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        kind, case, *mode = args.worker.split("/")
        if kind == "time":
            C.emit(measure_time(case, args.steps, args.blocks, quick=False))
        else:
            C.emit(measure_rss(case, mode[0], quick=False))
        return

    cases = [c for c in args.cases.split(",") if c]
    reps, steps, blocks, pin = args.reps, args.steps, args.blocks, C.pin_prefix(args.cpu)
    if args.quick:
        reps, steps, blocks, pin = 1, 1, 2, []

    print("# Activation checkpointing: peak memory and step time, with vs without")
    print(
        C.machine_facts(
            args.threads, C.describe_pin(pin, "--quick" if args.quick else "taskset unavailable")
        )
    )
    print(
        f"fp32, SGD lr 0.01; step time from {blocks} alternating blocks of {steps} steps per "
        f"mode; {reps} repetition(s); "
        + ("--quick: tiny models, all in this process" if args.quick else "fresh processes")
    )
    sys.stdout.flush()

    env = C.single_thread_env(args.threads)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed activations return to the OS (peak RSS)
    me = [*pin, sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads)]
    timed: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    rss: dict[tuple[str, str], list[dict[str, Any]]] = {(c, m): [] for c in cases for m in MODES}
    t_start = time.perf_counter()
    for rep in range(reps):
        for case in C.interleaved(cases, rep):
            if args.quick:
                import torch

                torch.set_num_threads(args.threads)
                timed[case].append(measure_time(case, steps, blocks, quick=True))
                for mode in MODES:
                    rss[(case, mode)].append(measure_rss(case, mode, quick=True))
                continue
            cmd = [*me, "--worker", f"time/{case}", "--steps", str(steps)]
            timed[case].append(C.run_child([*cmd, "--blocks", str(blocks)], env=env))
            for mode in C.interleaved(MODES, rep):
                res = C.run_child([*me, "--worker", f"rss/{case}/{mode}"], env=env)
                rss[(case, mode)].append(res)
        print(f"  rep {rep + 1}/{reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if args.json:
        raw = {"time": timed, "rss": {f"{c}/{m}": v for (c, m), v in rss.items()}}
        Path(args.json).write_text(json.dumps(raw, indent=1))
    report(timed, rss, cases, quick=args.quick)


def report(
    timed: dict[str, list[dict[str, Any]]],
    rss: dict[tuple[str, str], list[dict[str, Any]]],
    cases: list[str],
    quick: bool,
) -> None:
    """One row per case and mode; ratios of ckpt to plain; the target line per case."""
    mib = 2**20
    rows = []
    verdicts = []
    for case in cases:
        runs = timed[case]
        mem_ratio = C.median([r["peak_ckpt"] / r["peak_plain"] for r in runs])
        time_ratios = [r["ms_ckpt"] / r["ms_plain"] for r in runs]
        rss_pairs = zip(rss[(case, "ckpt")], rss[(case, "plain")], strict=True)
        rss_ratios = [a["rss_growth"] / b["rss_growth"] for a, b in rss_pairs if b["rss_growth"]]
        for mode in MODES:
            growth = [r["rss_growth"] for r in rss[(case, mode)] if r["rss_growth"] is not None]
            ms = [r[f"ms_{mode}"] for r in runs]
            plain = mode == "plain"
            rows.append(
                [
                    case,
                    mode,
                    0 if plain else runs[0]["units"],
                    f"{C.median([r[f'peak_{mode}'] for r in runs]) / mib:.1f}",
                    "1.000" if plain else f"{mem_ratio:.3f}",
                    f"{C.median(growth) / mib:.1f}" if growth else "-",
                    "1.000" if plain or not rss_ratios else
                    f"{C.median(rss_ratios):.3f} ({C.spread(rss_ratios)})",
                    f"{C.median(ms):.1f}",
                    C.spread(ms),
                    "1.000" if plain else f"{C.median(time_ratios):.3f} ({C.spread(time_ratios)})",
                ]
            )  # fmt: skip
        cut, slow = 1 - mem_ratio, C.median(time_ratios)
        ok = cut >= TARGET_MEMORY_CUT and slow <= TARGET_TIME_RATIO
        verdicts.append(
            f"target activation memory cut >= {TARGET_MEMORY_CUT:.0%} at step time <= "
            f"{TARGET_TIME_RATIO}x, {case}: cut {cut:.0%}, time ratio {slow:.3f}x -> "
            f"{'PASS' if ok else 'FAIL'}"
        )
    headers = [
        "case",
        "mode",
        "checkpointed units",
        "peak activation MiB",
        "activation ratio",
        "peak RSS growth MiB",
        "RSS ratio (min-max)",
        "ms/step (median)",
        "ms/step min-max",
        "step time ratio (min-max)",
    ]
    print()
    for case in cases:
        print(f"- {case}: {DESCRIPTIONS[case]}" + (" (--quick: tiny)" if quick else ""))
    print(C.table(headers, rows))
    print(
        "\nRatios: ckpt / plain, median over repetitions (step time: from the same process; "
        "RSS: from neighbouring processes). Peak activation: live tensor bytes during one "
        "forward+backward above the level before it, gradients pre-allocated (exact, so it has "
        "no spread)."
    )
    if quick:
        print("--quick: tiny models; the numbers above are not a measurement.")
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()

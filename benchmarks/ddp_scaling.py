"""DDP on CPU (gloo): samples/s for 1 and 2 processes, and what ``no_sync`` saves under gradient
accumulation.

Every configuration is its own ``python -m torch.distributed.run --standalone --nproc-per-node N``
launch of this script's ``--worker`` mode, so it goes through Kiln's real distributed path:
``Engine(device="cpu", strategy=...)`` joins torchrun's process group, ``engine.setup`` wraps the
model in ``DistributedDataParallel``, ``make_loader(..., rank=r, world=w)`` shards the data.

Model and data: MLP 256-1024-1024-10 (1.3 M parameters, compute-heavy per sample) on synthetic
data (4096 samples of 256 standard-normal features, labels = argmax of a fixed random linear map
to 10 classes, fixed seed), cross-entropy,
SGD lr 0.01 momentum 0.9, fp32, one torch thread per process, GLOBAL batch 256 (per rank:
256 / processes). Same initial weights everywhere (``torch.manual_seed(0)``).

Cases (``--cases``):

* ``single_1p`` (baseline): 1 process, ``strategy="single"`` (no DDP wrapper, no process group).
* ``ddp_1p``: 1 process, ``strategy="ddp"`` (DDP with a world of one: the wrapper's own cost).
* ``ddp_2p``: 2 processes, ``strategy="ddp"``, 128 samples per rank per step.
  Scaling efficiency = samples/s(2 processes) / (2 x samples/s(1 process)).
* ``accum_nosync``: 2 processes, ``Engine(accumulate=4)``: the Engine enters DDP's ``no_sync()``
  on the 3 non-update micro-steps, so gradients are all-reduced once per update.
* ``accum_sync``: the same work without ``no_sync``: ``Engine(accumulate=1)``, the loss weighted
  by 1/4 (``micro_step(..., weight=0.25)``, the same factor as above) and the optimizer stepped by
  hand on every 4th micro-step; DDP all-reduces after every micro-step's backward.

Both accumulation cases register the same DDP comm hook, which wraps
``default_hooks.allreduce_hook`` and records each call (one per gradient bucket) and the time from
the call to the completion of its future (gloo runs it asynchronously, overlapping the rest of
backward, so the sum over buckets is latency, not necessarily time the step waited for).

What is timed (in the workers, wall clock): after 5 warm-up updates (DDP rebuilds its buckets
after the first), a barrier, then a fixed number of updates (60; accumulation: 15 of 4
micro-steps). Each rank reads its own clock; the slowest rank's time is reported, with the
largest all-reduce count and time of any rank. samples/s = updates x micro-steps x global batch
/ elapsed. Process start, imports, data and model setup are not timed.

Pinning: each rank pins itself to core ``--cpus[LOCAL_RANK]`` (default cores 0 and 1), so the
1-process cases run on core 0 and the 2-process case uses both cores of a 2-core machine.

Run:  .venv/bin/python benchmarks/ddp_scaling.py            (about 4 minutes, 5 reps)
      .venv/bin/python benchmarks/ddp_scaling.py --quick    (smoke test, ~30 s: 4 launches)
"""

# No ``from __future__ import annotations`` here: DDP checks the comm hook's annotations at
# runtime (``dist.GradBucket``, ``torch.futures.Future[torch.Tensor]``) and rejects strings.

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CASES = ("single_1p", "ddp_1p", "ddp_2p", "accum_nosync", "accum_sync")
NPROC = {"single_1p": 1, "ddp_1p": 1, "ddp_2p": 2, "accum_nosync": 2, "accum_sync": 2}
ACCUM = 4
WIDTHS = (256, 1024, 1024, 10)
N_SAMPLES = 4096
WARMUP_UPDATES = 5


# ---------------------------------------------------------------------------------- worker


def _worker(case: str, global_batch: int, updates: int, cpus: list[int]) -> dict[str, Any] | None:
    """One rank of one configuration; returns rank 0's result (None on other ranks)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from kiln.data.base import ArrayDataset
    from kiln.data.loader import make_loader, start_epoch
    from kiln.train import distributed
    from kiln.train.engine import Engine

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    pinned = "none"
    if cpus and hasattr(os, "sched_setaffinity"):
        cpu = cpus[local_rank % len(cpus)]
        if cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})
            pinned = str(cpu)
    torch.set_num_threads(1)

    accumulate = ACCUM if case == "accum_nosync" else 1
    strategy = "single" if case == "single_1p" else "ddp"
    engine = Engine(device="cpu", strategy=strategy, accumulate=accumulate)
    rank, world = engine.world.rank, engine.world.size
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} ranks")
    per_rank = global_batch // world

    g = torch.Generator().manual_seed(1234)  # the same data on every rank; the loader shards it
    x = torch.randn(N_SAMPLES, WIDTHS[0], generator=g)
    y = (x @ torch.randn(WIDTHS[0], WIDTHS[-1], generator=g)).argmax(1)  # learnable labels
    loader = make_loader(
        ArrayDataset(x, y), batch_size=per_rank, shuffle=True, seed=0, rank=rank, world=world
    )

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    model, _ = engine.setup(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    stats = {"calls": 0, "comm_s": 0.0}
    if case.startswith("accum"):

        def hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            t0 = time.perf_counter()
            stats["calls"] += 1

            def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
                stats["comm_s"] += time.perf_counter() - t0
                return fut.value()

            return default_hooks.allreduce_hook(state, bucket).then(done)  # type: ignore[arg-type]

        assert isinstance(model, nn.parallel.DistributedDataParallel)
        model.register_comm_hook(None, hook)

    micro = ACCUM if case.startswith("accum") else 1
    weight = 1.0 / micro if case == "accum_sync" else None

    def batches() -> Any:
        epoch = 0
        while True:
            start_epoch(loader, epoch)
            yield from loader
            epoch += 1

    stream = batches()
    losses: list[torch.Tensor] = []

    def run(n_updates: int) -> None:
        for _ in range(n_updates):
            for i in range(micro):
                xb, yb = next(stream)
                with engine.micro_step(i, micro, weight=weight) as update:
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    engine.backward(loss)
                if micro == 1 or i == micro - 1:  # accum_sync: update is True on every micro-step
                    assert update or case == "accum_sync"
                    engine.optimizer_step(opt)
            losses.append(loss.detach())

    run(WARMUP_UPDATES)
    distributed.barrier()
    stats["calls"], stats["comm_s"] = 0, 0.0
    t0 = time.perf_counter()
    run(updates)
    elapsed = time.perf_counter() - t0
    checksum = sum(float(p.detach().double().abs().sum()) for p in net.parameters())
    mine = {
        "elapsed": elapsed,
        "calls": stats["calls"],
        "comm_s": stats["comm_s"],
        "pinned": pinned,
    }
    every = distributed.all_gather_object(mine)
    engine.close()
    if rank != 0:
        return None
    slow = max(every, key=lambda r: r["elapsed"])
    samples = updates * micro * global_batch
    return {
        "case": case,
        "world": world,
        "strategy": strategy,
        "per_rank": per_rank,
        "threads": torch.get_num_threads(),
        "pinned": ",".join(r["pinned"] for r in every),
        "elapsed": slow["elapsed"],
        "samples_per_s": samples / slow["elapsed"],
        "ms_per_update": 1e3 * slow["elapsed"] / updates,
        "calls_per_update": max(r["calls"] for r in every) / updates,
        "comm_ms_per_update": 1e3 * max(r["comm_s"] for r in every) / updates,
        "final_loss": float(losses[-1]),
        "checksum": checksum,
    }


# ---------------------------------------------------------------------------------- launcher


def run_torchrun(nproc: int, args: list[str], *, timeout: float) -> Any:
    """Launch ``torchrun --standalone --nproc-per-node N this_script ARGS`` in its own session.

    On timeout the whole process group (torchrun and its workers) is killed. Returns the JSON of
    the ``RESULT`` line rank 0 printed.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(Path(__file__).resolve()),
        *args,
    ]
    env = C.single_thread_env(1)
    proc = subprocess.Popen(
        cmd,
        cwd=str(C.ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise RuntimeError(
            f"timed out after {timeout:.0f} s (process group killed): {' '.join(cmd)}\n"
            f"--- stderr ---\n{err[-3000:]}"
        ) from None
    for line in reversed(out.splitlines()):
        if line.startswith(C.RESULT_PREFIX):
            return json.loads(line[len(C.RESULT_PREFIX) :])
    raise RuntimeError(
        f"{' '.join(cmd)} exited {proc.returncode} without a result\n"
        f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
    )


def _ratio_cell(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    return f"{C.median(xs):.{digits}f} ({C.spread(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 rep, few steps, < 30 s")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument(
        "--global-batch", type=int, default=256, help="samples per micro-step, all ranks together"
    )
    ap.add_argument("--updates", type=int, default=60, help="timed updates (throughput cases)")
    ap.add_argument(
        "--accum-updates", type=int, default=15, help=f"timed updates of {ACCUM} micro-steps"
    )
    ap.add_argument("--cpus", default="0,1", help="core per local rank ('' or -1: no pinning)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cpus = [int(c) for c in args.cpus.split(",") if c.strip() and int(c) >= 0]

    if args.worker:
        updates = args.accum_updates if args.worker.startswith("accum") else args.updates
        res = _worker(args.worker, args.global_batch, updates, cpus)
        if res is not None:
            C.emit(res)
        return

    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; allowed: {', '.join(CASES)}")
    reps, updates, accum_updates = args.reps, args.updates, args.accum_updates
    if args.quick:
        reps, updates, accum_updates = 1, 10, 3
        cases = [c for c in cases if c != "ddp_1p"]

    print("# DDP scaling on CPU (gloo): 1 vs 2 processes, and no_sync under accumulation")
    pin = f"rank r pinned to core [{args.cpus}][r] (in the worker)" if cpus else "none"
    print(C.machine_facts(1, pin))
    print(
        f"MLP {'-'.join(map(str, WIDTHS))}, synthetic data, global batch {args.global_batch}, "
        f"fp32, SGD; {WARMUP_UPDATES} warm-up updates, then {updates} timed updates "
        f"(accumulation: {accum_updates} updates of {ACCUM} micro-steps); {reps} interleaved "
        "repetition(s); each case a fresh torchrun launch (gloo, one torch thread per process)"
        + (" (--quick: a smoke test, not a measurement)" if args.quick else "")
    )
    sys.stdout.flush()

    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    t_start = time.perf_counter()
    for rep in range(reps):
        for case in C.interleaved(cases, rep):
            wargs = [
                "--worker",
                case,
                "--global-batch",
                str(args.global_batch),
                "--updates",
                str(updates),
                "--accum-updates",
                str(accum_updates),
                "--cpus",
                ",".join(map(str, cpus)) if cpus else "-1",
            ]
            results[case].append(run_torchrun(NPROC[case], wargs, timeout=args.timeout))
        print(f"  rep {rep + 1}/{reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def per_rep(case: str, base: str, key: str, invert: bool = False) -> list[float]:
        if case not in results or base not in results:
            return []
        pairs = zip(results[case], results[base], strict=True)
        return [(b[key] / a[key]) if invert else (a[key] / b[key]) for a, b in pairs]

    thr = [c for c in ("single_1p", "ddp_1p", "ddp_2p") if c in results]
    if thr:
        rows = []
        for case in thr:
            runs = results[case]
            sps = [r["samples_per_s"] for r in runs]
            world = runs[0]["world"]
            eff_single = [x / world for x in per_rep(case, "single_1p", "samples_per_s")]
            eff_ddp = [x / world for x in per_rep(case, "ddp_1p", "samples_per_s")]
            rows.append(
                [
                    case,
                    runs[0]["world"],
                    runs[0]["strategy"],
                    runs[0]["per_rank"],
                    runs[0]["pinned"],
                    f"{C.median(sps):.0f} ({min(sps):.0f}-{max(sps):.0f})",
                    f"{C.median([r['ms_per_update'] for r in runs]):.1f}",
                    _ratio_cell(eff_single),
                    _ratio_cell(eff_ddp),
                ]
            )
        print(f"\n## Throughput (global batch {args.global_batch}, no accumulation)\n")
        print(
            C.table(
                [
                    "case",
                    "processes",
                    "strategy",
                    "per-rank batch",
                    "cores",
                    "samples/s median (min-max)",
                    "ms/step",
                    "efficiency vs single_1p (min-max)",
                    "efficiency vs ddp_1p (min-max)",
                ],
                rows,
            )
        )
        print(
            "\nefficiency = samples/s(case) / (processes x samples/s(baseline)), the median of "
            "per-repetition ratios; 1.0 = linear scaling."
        )

    acc = [c for c in ("accum_nosync", "accum_sync") if c in results]
    if acc:
        rows = []
        for case in acc:
            runs = results[case]
            ms = [r["ms_per_update"] for r in runs]
            rows.append(
                [
                    case,
                    "yes" if case == "accum_nosync" else "no",
                    f"{C.median([r['calls_per_update'] for r in runs]):.2f}",
                    _ratio_cell(per_rep(case, "accum_nosync", "calls_per_update"), 2),
                    f"{C.median([r['comm_ms_per_update'] for r in runs]):.1f} "
                    f"({C.spread([r['comm_ms_per_update'] for r in runs])})",
                    _ratio_cell(per_rep(case, "accum_nosync", "comm_ms_per_update"), 2),
                    f"{C.median(ms):.1f} ({C.spread(ms)})",
                    _ratio_cell(per_rep(case, "accum_nosync", "ms_per_update")),
                    f"{C.median([r['samples_per_s'] for r in runs]):.0f}",
                    f"{runs[0]['final_loss']:.4f}",
                    f"{runs[0]['checksum']:.6g}",
                ]
            )
        print(
            f"\n## Accumulation: 2 processes, accumulate={ACCUM}, global batch "
            f"{args.global_batch} per micro-step\n"
        )
        print(
            C.table(
                [
                    "loop",
                    "no_sync",
                    "all-reduce calls / update",
                    "calls ratio to accum_nosync",
                    "all-reduce ms / update (min-max)",
                    "all-reduce time ratio",
                    "ms / update median (min-max)",
                    "step time ratio to accum_nosync (min-max)",
                    "samples/s",
                    "final loss",
                    "param checksum",
                ],
                rows,
            )
        )
        print(
            "\nall-reduce calls: comm-hook calls (one per DDP gradient bucket) per optimizer "
            "update, on the rank with most; all-reduce ms: sum over calls of hook call -> future "
            "done (async, overlaps backward). Same data order and initial weights in both loops, "
            "so final loss and parameter checksum should agree (up to float rounding)."
        )
    if args.quick:
        print("(--quick: 1 repetition, few updates; a smoke test, not a measurement)")


if __name__ == "__main__":
    main()

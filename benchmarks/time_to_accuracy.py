"""Claim: the default job (configs/digits.yaml) reaches 98% validation accuracy sooner than the
same training written by hand in plain PyTorch (fp32).

Loops compared (``--loops``), each in its own pinned process with the same torch thread count:

* ``kiln``: ``Trainer(load_config("configs/digits.yaml", ["log.progress=false", out_dir]))``,
  the default job as shipped: ResNet (BasicBlock, depths [1, 1, 1], width 16) on digits upsampled
  to 1x32x32, bf16 autocast, fused AdamW (lr 0.003, wd 0.05, no decay on bias/BN),
  warmup-cosine per update (10% warmup), batch 64, validation with torchmetrics after every
  epoch, a checkpoint after every epoch and TensorBoard scalars (all part of its time).
* ``kiln_lean``: the same job with ``checkpoint.every_epoch=false log.tensorboard=false``: what
  the per-epoch checkpoint and TensorBoard cost.
* ``raw_fp32``: a hand-written loop with the same model (``kiln.models.resnet.build_resnet``,
  same seed, so the same initial weights), the same data split (``kiln.data.build_data``: same
  rows, same normalisation), AdamW with the same two parameter groups and the same warmup-cosine
  LambdaLR, fp32; data through ``TensorDataset + DataLoader(shuffle=True)`` as guides teach;
  accuracy on the validation split after every epoch.
* ``raw_bf16``: ``raw_fp32`` with ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward
  and loss (and evaluation), to show how much of Kiln's lead is its bf16 default.

What is timed (wall, in process): from the first training batch (Kiln: ``on_fit_start``, after
setup) to the end of the first validation pass whose accuracy is >= 98%; each run then stops.
Setup (data, model, run directory; Kiln's TensorBoard writer) is reported separately. A run that
never reaches 98% in the config's 12 epochs is reported as such and left out of the ratios.

Run:  .venv/bin/python benchmarks/time_to_accuracy.py            (about 2.5 minutes, 3 reps)
      .venv/bin/python benchmarks/time_to_accuracy.py --quick    (smoke test, < 30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

LOOPS = ("kiln", "kiln_lean", "raw_fp32", "raw_bf16")
CONFIG = C.ROOT / "configs" / "digits.yaml"


def run_kiln(lean: bool, target: float, max_epochs: int | None) -> dict[str, Any]:
    from kiln.config import load_config
    from kiln.train.trainer import Trainer, TrainingInterrupted

    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-tta-") as tmp:
        overrides = [f"out_dir={tmp}", "log.progress=false"]
        if lean:
            overrides += ["checkpoint.every_epoch=false", "log.tensorboard=false"]
        cfg = load_config(CONFIG, overrides)
        out: dict[str, Any] = {"reached": False, "best_acc": 0.0, "epochs": 0}

        class Clock:
            def on_fit_start(self, trainer: Any) -> None:
                out["setup_s"] = time.perf_counter() - t_setup
                out["t0"] = time.perf_counter()

            def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
                now = time.perf_counter()
                out["epochs"] = trainer.epoch + 1  # validation runs before the epoch counter moves
                out["best_acc"] = max(out["best_acc"], metrics["acc"])
                out["train_s"] = now - out["t0"]
                if metrics["acc"] >= target:
                    out["reached"] = True
                if out["reached"] or (max_epochs is not None and out["epochs"] >= max_epochs):
                    trainer.request_stop("benchmark done")  # saves a checkpoint, then raises

        trainer = Trainer(cfg, callbacks=[Clock()], verbose=False)
        out["precision"] = cfg.precision
        with contextlib.suppress(TrainingInterrupted):  # our request_stop() ends the run
            trainer.fit()
    out.pop("t0")
    return out


def run_raw(bf16: bool, target: float, max_epochs: int | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from kiln.config import load_config
    from kiln.data import build_data
    from kiln.models.resnet import build_resnet

    t_setup = time.perf_counter()
    cfg = load_config(CONFIG, [])  # read only for the data split and the hyper-parameters
    torch.manual_seed(cfg.seed)
    bundle = build_data(cfg.data, seed=cfg.seed, layout="image")
    train, val = bundle.train, bundle.val
    base = train.dataset  # an ArrayDataset of all rows; the splits are Subsets of it
    x_tr, y_tr = base.x[train.indices], base.y[train.indices]
    x_va, y_va = base.x[val.indices], base.y[val.indices]
    model = build_resnet(bundle.info, **cfg.model.kwargs)

    # The usual recipe: weight decay on conv/linear weights only.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
    )
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=cfg.data.batch_size, shuffle=True)
    epochs = cfg.train.epochs
    total = len(loader) * epochs
    warmup = int(cfg.scheduler.warmup_fraction * total)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    def autocast() -> Any:
        if bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    out: dict[str, Any] = {"reached": False, "best_acc": 0.0, "epochs": 0}
    out["precision"] = "bf16" if bf16 else "fp32"
    out["setup_s"] = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    for epoch in range(epochs if max_epochs is None else min(epochs, max_epochs)):
        model.train()
        for xb, yb in loader:
            with autocast():
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = 0
        with torch.inference_mode(), autocast():
            for s in range(0, len(x_va), cfg.data.batch_size):
                logits = model(x_va[s : s + cfg.data.batch_size])
                correct += int((logits.argmax(1) == y_va[s : s + cfg.data.batch_size]).sum())
        acc = correct / len(x_va)
        out["epochs"] = epoch + 1
        out["best_acc"] = max(out["best_acc"], acc)
        out["train_s"] = time.perf_counter() - t0
        if acc >= target:
            out["reached"] = True
            break
    return out


def measure(loop: str, threads: int, target: float, max_epochs: int | None) -> dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # third-party deprecation chatter; not a result
    torch.set_num_threads(threads)
    if loop in ("kiln", "kiln_lean"):
        res = run_kiln(loop == "kiln_lean", target, max_epochs)
    elif loop in ("raw_fp32", "raw_bf16"):
        res = run_raw(loop == "raw_bf16", target, max_epochs)
    else:
        raise ValueError(f"unknown loop {loop!r}; allowed: {', '.join(LOOPS)}")
    res.update(loop=loop, threads=torch.get_num_threads())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 epoch each, < 30 s")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--target", type=float, default=0.98, help="validation accuracy to reach")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--max-epochs", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        C.emit(measure(args.worker, args.threads, args.target, args.max_epochs))
        return

    loops = [lp for lp in args.loops.split(",") if lp]
    reps, max_epochs = args.reps, None
    if args.quick:
        reps, max_epochs = 1, 1
        loops = [lp for lp in loops if lp != "kiln_lean"]
    pin = C.pin_prefix(args.cpu if args.threads == 1 else -1)
    print("# Time to 98% validation accuracy: the default job (configs/digits.yaml) vs raw loops")
    print(C.machine_facts(args.threads, C.describe_pin(pin, "taskset unavailable or threads>1")))
    print(
        f"target: validation accuracy >= {args.target:.0%} (val split: 180 digits, so >= 177 "
        f"right); evaluated after every epoch; at most 12 epochs; {reps} interleaved "
        "repetition(s), one process per run"
        + (
            " (--quick: 1 epoch each, the target is not expected to be reached)"
            if args.quick
            else ""
        )
    )
    sys.stdout.flush()

    env = C.single_thread_env(args.threads)
    results: dict[str, list[dict[str, Any]]] = {lp: [] for lp in loops}
    t_start = time.perf_counter()
    for rep in range(reps):
        for loop in C.interleaved(loops, rep):
            cmd = [
                *pin,
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                loop,
                "--threads",
                str(args.threads),
                "--target",
                str(args.target),
            ]
            if max_epochs is not None:
                cmd += ["--max-epochs", str(max_epochs)]
            results[loop].append(C.run_child(cmd, env=env))
        took = time.perf_counter() - t_start
        print(f"  rep {rep + 1}/{reps} done ({took:.0f} s)", flush=True)

    def ratio(loop: str, base: str, per_epoch: bool = False) -> str:
        """Median per-repetition ratio of time to target (or of seconds per epoch)."""
        if base not in results:
            return "-"
        pairs = zip(results[loop], results[base], strict=True)
        if per_epoch:
            rs = [(a["train_s"] / a["epochs"]) / (b["train_s"] / b["epochs"]) for a, b in pairs]
        else:
            rs = [a["train_s"] / b["train_s"] for a, b in pairs if a["reached"] and b["reached"]]
        return f"{C.median(rs):.2f} ({C.spread(rs)})" if rs else "-"

    rows = []
    for loop in loops:
        runs = results[loop]
        hit = [r for r in runs if r["reached"]]
        t98 = [r["train_s"] for r in hit]
        rows.append(
            [
                loop,
                runs[0]["precision"],
                f"{C.median(t98):.1f} ({C.spread(t98)})" if t98 else "not reached",
                f"{len(hit)}/{len(runs)}",
                "/".join(str(r["epochs"]) for r in runs),
                f"{C.median([r['train_s'] / r['epochs'] for r in runs]):.2f}",
                f"{C.median([r['setup_s'] for r in runs]):.2f}",
                f"{C.median([r['best_acc'] for r in runs]):.4f}",
                ratio(loop, "raw_fp32"),
                ratio(loop, "raw_bf16"),
                ratio(loop, "raw_fp32", per_epoch=True),
            ]
        )
    print()
    print(
        C.table(
            [
                "loop",
                "precision",
                "s to target, median (min-max)",
                "reached",
                "epochs per run",
                "s/epoch",
                "setup s",
                "best val acc",
                "time ratio to raw_fp32",
                "time ratio to raw_bf16",
                "s/epoch ratio to raw_fp32",
            ],
            rows,
        )
    )
    print(
        "\nseconds: from the first training batch to the end of the validation that reached the "
        "target (setup excluded, shown apart). Ratios: median of per-repetition ratios; < 1 "
        "means sooner/faster than the baseline. Time ratios combine speed per epoch and the "
        "number of epochs needed (which depends on each loop's shuffle order); the s/epoch ratio "
        "is speed alone."
    )
    if args.quick:
        print("(--quick: 1 epoch, 1 repetition; a smoke test, not a measurement)")


if __name__ == "__main__":
    main()

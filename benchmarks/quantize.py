"""Claim: int8 quantization makes CPU inference >= 3x faster than fp32 eager on every int8 path
(the best >= 5x) for a Linear-heavy model, and costs <= 0.5 point of digits accuracy.

Models (``--cases``):

* ``mlp4k``: 4 x (Linear(1024, 1024) + ReLU), seeded random weights, random normal inputs; the
  "accuracy" is top-1 agreement with the fp32 model on 1024 random inputs (labels = fp32
  argmax), so a drop measures how often int8 changes the answer;
* ``digits_mlp``: ``configs/digits_mlp.yaml`` (MLP 64-256-256-10 on flat 8x8 digits);
* ``digits_resnet``: ``configs/digits.yaml`` (the default job's ResNet on 1x32x32 digits).

The digits models are trained first with their shipped configs (``--epochs-mlp`` /
``--epochs-resnet`` override the epochs) or read from run directories (``--mlp-run`` /
``--resnet-run``); accuracy is on their held-out test split.

Methods (``--methods``), each measured against ``fp32`` (eager, the baseline of every ratio):

* ``dynamic``: ``torch.ao`` dynamic int8 (``quantize(model, "dynamic")``);
* ``static``: FX graph mode static int8, fused Conv+BN+ReLU, x86 qconfig mapping
  (``quantize(model, "static", ...)``, ``prepare_fx``/``convert_fx``);
* ``pt2e``: torchao PT2E with ``X86InductorQuantizer``, compiled by Inductor with freezing on
  (``kiln.compress.quantize.pt2e.quantize_pt2e``);
* ``ort_fp32``: the fp32 ONNX export (dynamo exporter) run by ONNX Runtime;
* ``ort_int8``: ORT dynamic int8 (``quantize_onnx_int8``);
* ``ort_int8_static``: ORT static int8, QDQ, per-channel weights (``static=True``).

Static methods calibrate on the first 32 batches (of 64) of the training split (mlp4k: random
batches).

How: every (method, repetition) runs in a fresh process, which quantizes (and compiles) the
model for every case on all allowed cores, then pins itself to one core (``--cpu``) with one
torch thread and one ORT intra-op thread, and measures with ``kiln.compress.report.measure``:
median of 30 timed forward passes after 5 warm-up passes, at batch 1 and batch 64, under
``torch.inference_mode``; then accuracy over the test split and the saved file's size. ORT
thus runs in a process of its own, with no torch work beside it. Methods are interleaved and
rotated over repetitions; a speed-up is the median over repetitions of (fp32 latency / method
latency) from the same repetition.

Run:  .venv/bin/python benchmarks/quantize.py            (about 12 minutes, training included)
      .venv/bin/python benchmarks/quantize.py --quick    (smoke test, < 30 s, in-process)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CASES = ("mlp4k", "digits_mlp", "digits_resnet")
METHODS = ("fp32", "dynamic", "static", "pt2e", "ort_fp32", "ort_int8", "ort_int8_static")
INT8 = ("dynamic", "static", "pt2e", "ort_int8", "ort_int8_static")
CONFIGS = {"digits_mlp": "configs/digits_mlp.yaml", "digits_resnet": "configs/digits.yaml"}
DESCRIBE = {
    "mlp4k": "MLP 4 x Linear(1024) + ReLU, random inputs (acc = top-1 agreement with fp32)",
    "digits_mlp": "digits MLP 64-256-256-10 (configs/digits_mlp.yaml), test split",
    "digits_resnet": "digits ResNet (1,1,1) x 16, 1x32x32 (configs/digits.yaml), test split",
}
BATCH, CALIB_BATCHES, WIDTH = 64, 32, 1024
TARGET_EVERY, TARGET_BEST, TARGET_DROP = 3.0, 5.0, 0.5  # x, x, accuracy points


# ---------------------------------------------------------------------------- setup (parent)


def build_mlp4k() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def prepare_mlp4k(folder: Path, quick: bool) -> dict[str, Any]:
    """Seeded weights, random calibration/test inputs, labels from the fp32 model."""
    import torch
    from safetensors.torch import save_model

    model = build_mlp4k()
    save_model(model, str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(BATCH, WIDTH, generator=g) for _ in range(4 if quick else CALIB_BATCHES)]
    x = torch.randn(256 if quick else 1024, WIDTH, generator=g)
    with torch.inference_mode():
        y = model(x).argmax(-1)
    return {"calib": calib, "x": x, "y": y, "source": "seeded random weights"}


def train_or_read(case: str, folder: Path, run: str | None, epochs: int | None) -> Path:
    """A run directory: the one given, or a fresh training run of the shipped config."""
    if run:
        return Path(run)
    from kiln.config import load_config
    from kiln.train.trainer import Trainer

    overrides = [f"out_dir={folder}", "log.tensorboard=false", "log.progress=false"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_config(C.ROOT / CONFIGS[case], overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")  # third-party deprecation chatter; not a result
        return Trainer(cfg, verbose=False).fit().run_dir


def prepare_digits(case: str, folder: Path, run_dir: Path) -> dict[str, Any]:
    """The run's test split and the first training batches (in order) for calibration."""
    import torch

    from kiln.config import load_config
    from kiln.train.build import build_data_for, loader_for

    cfg = load_config(run_dir / "config.yaml", [f"data.batch_size={BATCH}"])
    data = build_data_for(cfg)
    assert data.test is not None, "the digits configs hold out a test split"
    cpu = torch.device("cpu")
    calib = []
    for x, _ in loader_for(cfg, data.train, train=False, device=cpu):
        calib.append(x)
        if len(calib) == CALIB_BATCHES:
            break
    xs, ys = zip(*loader_for(cfg, data.test, train=False, device=cpu), strict=True)
    return {"calib": calib, "x": torch.cat(xs), "y": torch.cat(ys), "run_dir": str(run_dir)}


def prepare(cases: list[str], folder: Path, args: argparse.Namespace) -> dict[str, str]:
    """Writes ``<folder>/<case>.pt`` (data) and returns where each case's model comes from."""
    import torch

    sources = {}
    for case in cases:
        t0 = time.perf_counter()
        if case == "mlp4k":
            blob = prepare_mlp4k(folder, args.quick)
        else:
            given = args.mlp_run if case == "digits_mlp" else args.resnet_run
            epochs = args.epochs_mlp if case == "digits_mlp" else args.epochs_resnet
            run_dir = train_or_read(case, folder / "runs", given, epochs)
            blob = prepare_digits(case, folder, run_dir)
            how = "read" if given else f"trained in {time.perf_counter() - t0:.0f} s"
            blob["source"] = f"{run_dir} ({how})"
        torch.save(blob, folder / f"{case}.pt")
        sources[case] = blob["source"]
    return sources


# ---------------------------------------------------------------------------- one measurement


def load_case(case: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    import torch

    blob = torch.load(folder / f"{case}.pt", weights_only=True)
    if case == "mlp4k":
        from safetensors.torch import load_model as st_load

        model = build_mlp4k()
        st_load(model, str(folder / "model.safetensors"))
    else:
        from kiln.train.checkpoint.weights import load_model

        model = load_model(blob["run_dir"])
    return model.eval(), blob


def apply(
    method: str, model: Any, calib: list[Any], example: Any, out: Path
) -> tuple[Any, Path, dict[str, Any]]:
    """(predict, saved file, notes) of ``method`` on ``model``."""
    from kiln.compress.quantize.onnx import quantize_onnx_int8
    from kiln.compress.quantize.pt2e import quantize_pt2e
    from kiln.deploy.onnx import export_onnx, onnx_predict, onnx_session

    out.mkdir(parents=True, exist_ok=True)
    if method == "fp32":
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
        return model, out / "model.safetensors", {}
    if method == "ort_fp32":
        path = export_onnx(model, example, out / "model.onnx")
        return onnx_predict(onnx_session(path)), path, {}
    if method in ("dynamic", "static"):
        from kiln.compress.quantize.core import quantize

        kw = {} if method == "dynamic" else {"calib_loader": calib, "example": example}
        q = quantize(model, method, **kw)
        notes: dict[str, Any] = {
            k: q.notes[k] for k in ("mode", "quantized", "float_layers") if k in q.notes
        }
    elif method == "pt2e":
        q = quantize_pt2e(model, calib, example)
        notes = {"compiled": q.notes["compiled"]}
    elif method in ("ort_int8", "ort_int8_static"):
        q = quantize_onnx_int8(model, calib, example, static=method == "ort_int8_static")
        notes = {"format": q.notes["format"]}
    else:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return q.predict, q.save(out), notes


def measure_one(
    method: str, case: str, folder: Path, reps: int, cpu: int, threads: int
) -> dict[str, Any]:
    """Quantize (all allowed cores), pin to ``cpu``, then size, latency and accuracy."""
    import torch

    from kiln.compress.report import measure

    torch.set_num_threads(threads)
    model, blob = load_case(case, folder)
    x, y = blob["x"], blob["y"]
    example = x[:BATCH]
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as tmp:
        t0 = time.perf_counter()
        predict, file, notes = apply(method, model, blob["calib"], example, Path(tmp) / method)
        quantize_s = time.perf_counter() - t0
        if cpu >= 0 and hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})  # quantized and compiled on all cores; timed on one
        loader = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        row = measure(method, predict, file, loader, example, task="classification", reps=reps)
    return {
        **row.to_dict(),
        "case": case,
        "method": method,
        "quantize_s": quantize_s,
        "notes": notes,
    }


# ---------------------------------------------------------------------------- orchestration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: mlp4k only, in-process")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--latency-reps", type=int, default=30, help="timed calls per latency")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mlp-run", help="run directory of a trained digits MLP (skips training)")
    ap.add_argument("--resnet-run", help="run directory of a trained digits ResNet")
    ap.add_argument("--epochs-mlp", type=int, help="train the digits MLP this long")
    ap.add_argument("--epochs-resnet", type=int, help="train the digits ResNet this long")
    ap.add_argument("--cpu", type=int, default=0, help="core to time on (-1: no pinning)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--worker", metavar="METHOD", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao deprecation chatter; not a result

    cases = [c for c in args.cases.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    if "fp32" not in methods:
        methods.insert(0, "fp32")  # the baseline of every ratio
    if args.worker:
        C.emit(
            [
                measure_one(
                    args.worker, c, Path(args.data), args.latency_reps, args.cpu, args.threads
                )
                for c in cases
            ]
        )
        return

    reps, latency_reps = args.reps, args.latency_reps
    if args.quick:
        cases, reps, latency_reps = ["mlp4k"], 1, 5
        methods = [m for m in methods if m != "ort_int8_static"]
    pinned = bool(C.pin_prefix(args.cpu)) and not args.quick
    print("# Int8 quantization: latency, size and accuracy against fp32 eager")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        C.machine_facts(
            args.threads,
            f"quantized on all allowed cores, timed on core {args.cpu} (sched_setaffinity)"
            if pinned
            else "none (--quick)"
            if args.quick
            else "none",
        )
    )
    print(
        f"{reps} interleaved repetition(s); latency = median of {latency_reps} timed calls "
        "after 5 warm-up calls (kiln.compress.report.measure); ORT: CPU provider, "
        "1 intra-op thread; "
        + (
            "--quick: mlp4k only, all in this process"
            if args.quick
            else "one process per method and repetition"
        )
    )
    sys.stdout.flush()

    t_start = time.perf_counter()
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quantize-") as tmp:
        folder = Path(tmp)
        sources = prepare(cases, folder, args)
        for case, src in sources.items():
            print(f"{case}: {DESCRIBE[case]}; model: {src}")
        print(f"setup done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        env = C.single_thread_env(args.threads)
        for rep in range(reps):
            for method in C.interleaved(methods, rep):
                order = C.interleaved(cases, rep)
                if args.quick:
                    out = [
                        measure_one(method, c, folder, latency_reps, -1, args.threads)
                        for c in order
                    ]
                else:
                    cmd = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--worker",
                        method,
                        "--cases",
                        ",".join(order),
                        "--data",
                        str(folder),
                        "--latency-reps",
                        str(latency_reps),
                        "--cpu",
                        str(args.cpu if pinned else -1),
                        "--threads",
                        str(args.threads),
                    ]
                    out = C.run_child(cmd, env=env, timeout=900)
                for res in out:
                    results.setdefault((res["case"], method), []).append(res)
            print(
                f"  rep {rep + 1}/{reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True
            )

    if args.json:
        Path(args.json).write_text(
            json.dumps({f"{c}/{m}": v for (c, m), v in results.items()}, indent=1)
        )
    report(results, cases, methods, reps)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\nrun time: {time.perf_counter() - t_start:.0f} s; load average at the end: {load}")


def per_rep_ratios(
    results: dict[tuple[str, str], list[dict[str, Any]]], case: str, method: str, key: str
) -> list[float]:
    """Per repetition: fp32 latency / method latency (a speed-up), same repetition."""
    pairs = zip(results[(case, "fp32")], results[(case, method)], strict=True)
    return [b[key] / m[key] for b, m in pairs]


def median_row(runs: list[dict[str, Any]]) -> Any:
    from kiln.compress.report import Row

    return Row(
        name=runs[0]["method"],
        size_bytes=int(C.median([r["size_bytes"] for r in runs])),
        latency_b1_ms=C.median([r["latency_b1_ms"] for r in runs]),
        latency_b64_ms=C.median([r["latency_b64_ms"] for r in runs]),
        metrics={k: C.median([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]},
    )


def report(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    cases: list[str],
    methods: list[str],
    reps: int,
) -> None:
    from kiln.compress.report import table

    best: dict[str, tuple[str, float]] = {}
    verdicts: list[str] = []
    for case in cases:
        print(f"\n## {case}: {DESCRIBE[case]}")
        print("\nMedians over repetitions (kiln.compress.report.table; ratios of the medians):\n")
        print(table([median_row(results[(case, m)]) for m in methods], baseline="fp32"))
        rows = []
        base_acc = C.median([r["metrics"]["acc"] for r in results[(case, "fp32")]])
        for m in methods:
            runs = results[(case, m)]
            b64 = per_rep_ratios(results, case, m, "latency_b64_ms")
            b1 = per_rep_ratios(results, case, m, "latency_b1_ms")
            acc = C.median([r["metrics"]["acc"] for r in runs])
            size = C.median([r["size_bytes"] for r in runs])
            base_size = C.median([r["size_bytes"] for r in results[(case, "fp32")]])
            notes = runs[0]["notes"]
            rows.append(
                [
                    m,
                    f"{C.median(b64):.2f} ({C.spread(b64)})",
                    f"{C.median(b1):.2f} ({C.spread(b1)})",
                    f"{base_size / size:.2f}",
                    f"{100 * acc:.2f}",
                    f"{100 * (acc - base_acc):+.2f}",
                    f"{C.median([r['quantize_s'] for r in runs]):.1f}",
                    "; ".join(f"{k}: {v}" for k, v in notes.items()) or "-",
                ]
            )
            if m in INT8:
                if case == "mlp4k":
                    ok = C.median(b64) >= TARGET_EVERY
                    verdicts.append(
                        f"{case} {m}: b64 speed-up {C.median(b64):.2f}x "
                        f"(target >= {TARGET_EVERY:g}x) -> {'PASS' if ok else 'FAIL'}"
                    )
                    if C.median(b64) > best.get(case, ("", 0.0))[1]:
                        best[case] = (m, C.median(b64))
                else:
                    drop = 100 * (base_acc - acc)
                    ok = drop <= TARGET_DROP
                    verdicts.append(
                        f"{case} {m}: accuracy drop {drop:+.2f} points "
                        f"(target <= {TARGET_DROP:g}) -> {'PASS' if ok else 'FAIL'}"
                    )
        headers = [
            "method",
            "b64 speed-up (min-max)",
            "b1 speed-up (min-max)",
            "size ratio",
            "acc %",
            "acc vs fp32 (points)",
            "quantize s",
            "notes",
        ]
        print("\nSpeed-up: median over repetitions of (fp32 / method), same repetition:\n")
        print(C.table(headers, rows))
    print()
    for line in verdicts:
        print("target " + line)
    for case, (m, r) in best.items():
        ok = r >= TARGET_BEST
        print(
            f"target {case} best int8 path: {m} {r:.2f}x (target >= {TARGET_BEST:g}x) -> "
            f"{'PASS' if ok else 'FAIL'}"
        )
    if reps < 5:
        print(f"(only {reps} repetition(s): a smoke test, not a measurement)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

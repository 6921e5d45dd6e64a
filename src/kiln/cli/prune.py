"""``kiln prune RUN``: prune a trained run, fine-tune it, and compare it with the original.

Reads the run's ``model.safetensors`` and ``config.yaml``, prunes a copy with
:func:`kiln.compress.prune.core.prune_model` (unstructured masks made permanent, or structured
channel removal), fine-tunes it with the Trainer and the run's config after every cycle, and
writes into ``RUN/pruned/`` (the next free ``RUN/pruned-N/`` if that exists, or ``--out``):

* ``model.safetensors``: the pruned weights (plain keys) with the run's config and the layer
  sizes in its metadata; load with ``kiln.compress.prune.load_pruned(folder)`` (an
  unstructured result also loads with ``kiln.load_model(folder / "model.safetensors")``);
* ``pruned.json``: what was done (sparsity per layer, widths, per-cycle accuracy);
* ``report.json`` and the printed table: the fp32 original vs the pruned model, size, latency at
  batch 1 and 64 (median, one thread) and test metrics, measured in the same process
  (:mod:`kiln.compress.report`); for unstructured pruning also the zlib-compressed file sizes,
  since zeros stored densely save nothing until compressed;
* ``finetune/cycle-<i>/``: each fine-tuning run (logs, checkpoints with pruning masks).

Models with BatchNorm get their running statistics re-estimated on the train split after each
pruning step (:func:`kiln.compress.prune.run.recalibrate_bn`), also with ``--finetune-epochs 0``.

Torch is imported inside the function, so ``kiln --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.common import Debug, TrustCode

__all__ = ["command", "register", "run_prune"]


def command(
    run: Annotated[str, typer.Argument(help="run directory (its model.safetensors)")],
    amount: Annotated[float, typer.Option(help="fraction to remove, in [0, 1)")] = 0.5,
    structured: Annotated[
        bool, typer.Option("--structured", help="remove whole channels/neurons (smaller layers)")
    ] = False,
    iterative: Annotated[int, typer.Option(help="prune + fine-tune cycles")] = 1,
    method: Annotated[str, typer.Option(help="l1 or random")] = "l1",
    scope: Annotated[str, typer.Option(help="layer (per layer) or global magnitude")] = "layer",
    finetune_epochs: Annotated[int, typer.Option(help="fine-tuning epochs per cycle")] = 1,
    rewind: Annotated[
        bool, typer.Option("--rewind", help="lottery ticket: rewind survivors to initial weights")
    ] = False,
    out: Annotated[str | None, typer.Option(help="output folder (default: RUN/pruned)")] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Prune a trained run (unstructured or structured), fine-tune, report size/speed/accuracy."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_prune(
            run,
            amount=amount,
            structured=structured,
            iterative=iterative,
            method=method,
            scope=scope,
            finetune_epochs=finetune_epochs,
            rewind=rewind,
            out=out,
            trust_code=trust_code,
        ),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln prune`` to ``app``."""
    app.command("prune")(command)


def _out_dir(run_dir: Path, out: str | None) -> Path:
    if out is None:
        from kiln.train.build import new_run_dir

        return new_run_dir(run_dir, "pruned")  # pruned, then pruned-1, ...: never overwrite
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--out {folder} is not empty; choose a new folder or delete it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_prune(
    run: str,
    *,
    amount: float = 0.5,
    structured: bool = False,
    iterative: int = 1,
    method: str = "l1",
    scope: str = "layer",
    finetune_epochs: int = 1,
    rewind: bool = False,
    out: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Prune the run's model, fine-tune it, save it and print the comparison table.

    Args:
        run: run directory (or a file in it).
        amount: final fraction of weights (or channels, with ``structured``) removed, ``[0, 1)``.
        structured: remove whole neurons/channels (smaller layers) instead of single weights.
        iterative: prune + fine-tune cycles; the sparsity grows geometrically to ``amount``.
        method: ``l1`` or ``random`` (structured also ``l2``).
        scope: ``layer`` or ``global`` (unstructured only).
        finetune_epochs: Trainer epochs after each pruning step (0: no fine-tuning).
        rewind: lottery ticket: reset the survivors to the run's initial weights (rebuilt from
            its config and seed) before each fine-tuning.
        out: output folder (default ``RUN/pruned``).
        trust_code: allow the run's ``model.target`` import path (see :mod:`kiln.trust`).

    Returns:
        The report written to ``report.json``.

    Example:
        >>> report = run_prune("runs/digits_mlp", amount=0.9, scope="global")  # doctest: +SKIP
    """
    from dataclasses import replace

    from kiln.compress.prune.core import PruneSpec

    spec = PruneSpec(amount, structured=structured, method=method, scope=scope, cycles=iterative)
    if isinstance(finetune_epochs, bool) or finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if finetune_epochs == 0 and iterative > 1:
        raise ValueError(
            "--iterative alternates pruning and fine-tuning; with --finetune-epochs 0 it equals "
            "one-shot pruning: set --finetune-epochs >= 1 or --iterative 1"
        )
    if finetune_epochs == 0 and rewind:
        raise ValueError(
            "--rewind resets the survivors to their initial values, which needs retraining: "
            "set --finetune-epochs >= 1"
        )

    import copy

    import torch

    from kiln.compress.prune import core as pr
    from kiln.compress.prune import run as prr
    from kiln.compress.report import measure, table
    from kiln.run import read_config, run_dir_of, weights_file
    from kiln.train import build
    from kiln.train.checkpoint.weights import load_model

    run_dir = run_dir_of(run)
    weights = weights_file(run_dir)
    cfg = read_config(run_dir)
    spec = replace(spec, seed=cfg.seed)
    data = build.build_data_for(cfg)
    task = data.info.task
    if task not in ("classification", "regression"):
        raise ValueError(
            f"kiln prune reports accuracy or MSE; a {task!r} run is not supported here: prune it "
            "from Python with kiln.compress.prune.core.prune_model"
        )
    split, dataset = ("test", data.test) if data.test is not None else ("val", data.val)
    if dataset is None:
        raise ValueError("the run has no test or validation split to measure the pruned model on")
    cpu = torch.device("cpu")
    loader = build.loader_for(cfg, dataset, train=False, device=cpu)
    example = next(iter(loader))[0]

    original = load_model(weights, trust_code=trust_code)
    initial = prr.initial_state(run_dir, trust_code=trust_code) if rewind else None
    folder = _out_dir(run_dir, out)
    finetune = None
    if finetune_epochs:
        finetune = prr.trainer_finetune(
            cfg, data, epochs=finetune_epochs, out_dir=folder / "finetune"
        )
    compressed = pr.prune_model(
        copy.deepcopy(original),
        spec,
        finetune=finetune,
        initial=initial,
        metadata=prr.kiln_metadata(cfg, data.info),
    )
    model = compressed.module
    assert model is not None
    if not finetune_epochs:  # fine-tuning starts with this pass; without it, do it here
        assert data.train is not None
        train = build.loader_for(cfg, data.train, train=False, device=cpu)
        compressed.notes["bn_recalibrated"] = prr.recalibrate_bn(model.to(cpu), train)
    model.to(cpu).eval()
    saved = compressed.save(folder)

    pct = f"{spec.amount:.0%}"
    name = f"structured {pct}" if structured else f"pruned {pct}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier timings, as kiln quantize; both rows alike
    try:
        rows = [
            measure("fp32", original, weights, loader, example, task=task),
            measure(name, compressed.predict, saved, loader, example, task=task),
        ]
    finally:
        torch.set_num_threads(threads)
    notes = compressed.notes
    _print_summary(run_dir, folder, spec, finetune_epochs, notes)
    print(f"\n{split} split, fp32 eager, one thread, same process:")
    shown = table(rows)
    print(shown)
    zipped = None
    if not structured:
        # Zeros are stored densely: same file, same dense kernels. What they can save on disk
        # shows once the file is compressed.
        zipped = {"fp32": _zipped_size(weights), "pruned": _zipped_size(saved)}
        print(
            f"zeros are stored densely; zlib-compressed the files are {zipped['fp32'] / 1e6:.3f} "
            f"MB (fp32) and {zipped['pruned'] / 1e6:.3f} MB (pruned), "
            f"{zipped['fp32'] / zipped['pruned']:.2f}x smaller"
        )
    report = {
        "run": str(run_dir),
        "out": str(folder),
        "weights": str(saved),
        "options": {
            "amount": spec.amount,
            "structured": spec.structured,
            "method": spec.method,
            "scope": spec.scope,
            "iterative": spec.cycles,
            "finetune_epochs": finetune_epochs,
            "rewind": "initial weights rebuilt from the run's config and seed" if rewind else None,
        },
        "split": split,
        "threads": 1,
        "rows": [r.to_dict() for r in rows],
        "table": shown,
        **{k: notes[k] for k in ("params", "sparsity", "cycles", "schedule")},
        "widths": notes.get("widths", {}),
        "zlib_bytes": zipped,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nsaved {saved} (load with kiln.compress.prune.load_pruned({str(folder)!r}))")
    print(f"wrote {folder / 'report.json'}")
    return report


def _print_summary(
    run_dir: Path, folder: Path, spec: Any, epochs: int, notes: dict[str, Any]
) -> None:
    kind = "structured" if spec.structured else f"unstructured, {spec.scope} scope"
    cycles = f"{spec.cycles} cycle{'s' if spec.cycles > 1 else ''}"
    tune = f"fine-tune {epochs} epoch(s) per cycle" if epochs else "no fine-tuning"
    rewind = ", rewound to the initial weights" if notes["rewind"] else ""
    print(f"pruned {run_dir} -> {folder}: {kind}, {spec.method}, {spec.amount:.0%}, {cycles}")
    print(f"  {tune}{rewind}")
    if spec.structured:
        print("\n| layer | before | after |\n|---|---|---|")
        for layer, w in notes["widths"].items():
            print(f"| {layer} | {_size(w['before'])} | {_size(w['after'])} |")
    else:
        print("\n| layer | shape | zero weights | sparsity |\n|---|---|---|---|")
        for layer, s in notes["sparsity"]["layers"].items():
            shape = "x".join(map(str, s["shape"]))
            print(f"| {layer} | {shape} | {s['zeros']}/{s['total']} | {s['sparsity']:.4f} |")
        t = notes["sparsity"]["total"]
        print(f"| total | | {t['zeros']}/{t['total']} | {t['sparsity']:.4f} |")
    p = notes["params"]
    print(f"parameters: {p['before']} -> {p['after']} ({p['after'] / p['before']:.3f}x)")
    for c in notes["cycles"]:
        ft = c.get("finetune", {})
        line = f"cycle {c['cycle']}: target {c['target']}"
        if "pruned" in ft and "finetuned" in ft:
            key = "acc" if "acc" in ft["pruned"] else "mse"
            line += f", {key} {ft['pruned'][key]:.4f} after pruning"
            if "recalibrated" in ft:
                line += f" -> {ft['recalibrated'][key]:.4f} with BatchNorm statistics re-estimated"
            line += f" -> {ft['finetuned'][key]:.4f} after fine-tuning"
        print(line)


def _zipped_size(path: Path) -> int:
    import zlib

    return len(zlib.compress(path.read_bytes(), 6))


def _size(w: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in w.items())

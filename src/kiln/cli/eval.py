"""``kiln eval RUN [RUN...]``: metrics of trained runs on a held-out split.

One run prints its metrics and confusion matrix and writes ``<run>/eval-<split>.json``, as it
always has. The other forms combine predictions (``kiln.algorithms``) and print one column per
model next to the combined one, so the gain is visible at a glance:

* ``kiln eval RUN --tta flip,shift`` (or ``kiln eval RUN tta=flip,shift``): test-time
  augmentation; columns "no TTA" and the TTA result; writes ``<run>/eval-<split>-tta.json``.
* ``kiln eval RUN_A RUN_B RUN_C [--vote]``: an ensemble of runs; one column per member and the
  ensemble; writes ``<RUN_A>/eval-<split>-ensemble.json`` (the first run's directory).
* ``kiln eval RUN --snapshots N [--vote]``: the run's last N checkpoints as an ensemble; writes
  ``<run>/eval-<split>-snapshots.json``.

With ``--tta`` as well, every member predicts with TTA and the ensemble combines those. The
ensemble file names gain ``-vote`` and ``-tta`` (in that order) when those are on, so the
variants do not overwrite each other: ``eval-test-ensemble-vote-tta.json``.
Torch is imported inside the functions, so ``kiln --help`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import Debug, TrustCode

if TYPE_CHECKING:
    from torch import nn

    from kiln.config import Config
    from kiln.data.base import DataBundle
    from kiln.train.engine import Engine

_TOKEN_KEYS = ("tta",)


def command(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="run directories (several = an ensemble), optionally followed by tta=flip,shift",
            show_default=False,
        ),
    ],
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    checkpoint: Annotated[
        str | None, typer.Option(help="evaluate this checkpoint (or 'last'/'best') instead")
    ] = None,
    tta: Annotated[
        str | None, typer.Option(help="test-time augmentation: flip, shift, noise (comma list)")
    ] = None,
    vote: Annotated[
        bool, typer.Option("--vote", help="ensemble by majority vote instead of mean probability")
    ] = False,
    snapshots: Annotated[
        int | None, typer.Option(help="snapshot ensemble of the run's last N checkpoints")
    ] = None,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Metrics of trained runs on the held-out split: one run, an ensemble, with or without TTA."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_eval(
            runs,
            split=split,
            checkpoint=checkpoint,
            tta=tta,
            vote=vote,
            snapshots=snapshots,
            trust_code=trust_code,
        ),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln eval`` to ``app``."""
    app.command("eval")(command)


def split_tokens(runs: Sequence[str], tta: str | None) -> tuple[list[str], str | None]:
    """Separate run paths from ``key=value`` tokens (``tta=flip,shift``) given among them.

    Raises:
        ValueError: an unknown key, or ``tta`` given twice with different values.
    """
    paths: list[str] = []
    for token in runs:
        key, eq, value = token.partition("=")
        if not eq or Path(token).exists():
            paths.append(token)
            continue
        if key.strip() not in _TOKEN_KEYS:
            raise ValueError(
                f"unknown option {token!r} after the runs; the one allowed as key=value is "
                "tta=<flip,vflip,shift,noise>; use --vote, --snapshots N, --split and "
                "--checkpoint for the others"
            )
        if tta is not None and tta != value:
            raise ValueError(f"TTA given twice: --tta {tta} and {token}; give it once")
        tta = value
    return paths, tta


def run_eval(
    runs: Sequence[str] | str,
    *,
    split: str = "test",
    checkpoint: str | None = None,
    tta: str | None = None,
    vote: bool = False,
    snapshots: int | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Evaluate one run, a run with TTA, an ensemble of runs, or a snapshot ensemble.

    Args:
        runs: run directories (several = an ensemble), optionally with ``tta=...`` tokens.
        split: ``test`` or ``val``.
        checkpoint: evaluate this checkpoint (a file, or ``last``/``best``) of a single run.
        tta: comma-separated TTA transforms (``flip``, ``vflip``, ``shift``, ``noise``).
        vote: combine an ensemble by majority vote instead of mean probability.
        snapshots: ensemble the single run's last N checkpoints.
        trust_code: allow a ``model.target`` import path read from the runs' files (see
            :mod:`kiln.trust`); off, such a run is refused before anything is imported.

    Returns:
        For one run without TTA, its metrics (and ``confusion_matrix``); otherwise a dict with
        ``metrics`` (the combined model), ``members`` (or ``plain`` for TTA) and the settings.
        The same dict is written as JSON (see the module docstring for where).
    """
    from kiln.algorithms.tta import parse_transforms
    from kiln.run import run_dir_of

    paths, tta = split_tokens([runs] if isinstance(runs, str) else list(runs), tta)
    if not paths:
        raise ValueError("give at least one run directory, e.g. kiln eval runs/digits")
    if split not in ("test", "val"):
        raise ValueError(f"--split must be test or val, got {split!r}")
    transforms = parse_transforms(tta)
    if tta is not None and not transforms:
        raise ValueError(f"tta={tta!r} names no transform; use e.g. tta=flip or tta=noise")
    run_dirs = [run_dir_of(p) for p in paths]
    if snapshots is not None and len(run_dirs) > 1:
        raise ValueError("--snapshots N ensembles the checkpoints of one run; give one run")
    if checkpoint and (len(run_dirs) > 1 or snapshots is not None):
        raise ValueError(
            "--checkpoint picks one checkpoint of one run; for an ensemble of checkpoints use "
            "--snapshots N, for an ensemble of runs drop --checkpoint"
        )
    if vote and len(run_dirs) == 1 and snapshots is None:
        raise ValueError("--vote combines several models: give several runs or --snapshots N")

    if transforms or len(run_dirs) > 1 or snapshots is not None:
        from kiln.run import read_data_info

        if read_data_info(run_dirs[0]).task == "multitask":
            raise ValueError(
                "TTA and ensembles of multi-task (several-output) models are not yet supported; "
                "evaluate the run alone: kiln eval RUN"
            )
    if len(run_dirs) > 1:
        return _eval_ensemble(run_dirs, split, transforms, vote, trust_code=trust_code)
    if snapshots is not None:
        return _eval_ensemble(
            run_dirs, split, transforms, vote, snapshots=snapshots, trust_code=trust_code
        )
    return _eval_single(run_dirs[0], split, checkpoint, transforms, trust_code=trust_code)


# --------------------------------------------------------------------------- the three forms


class _Setup:
    """What every form needs: the run's config, its data split, an engine, loss and metrics."""

    def __init__(self, run_dir: Path, split: str) -> None:
        from kiln.run import read_config
        from kiln.train import build
        from kiln.train.engine import Engine
        from kiln.train.metrics import build_metrics

        self.cfg: Config = read_config(run_dir)
        self.data: DataBundle = build.build_data_for(self.cfg)
        dataset = self.data.test if split == "test" else self.data.val
        if dataset is None:
            raise ValueError(f"this run has no {split} split (data.{split}_fraction=0)")
        self.n = len(dataset)  # type: ignore[arg-type]
        self.engine: Engine = Engine(
            device=self.cfg.device,
            precision=self.cfg.precision,
            allow_fp16_cpu=self.cfg.allow_fp16_cpu,
        )
        self.loader = build.loader_for(self.cfg, dataset, train=False, device=self.engine.device)
        info = self.data.info
        self.loss_fn = build.loss_for(self.cfg, self.data)
        self.metrics = build_metrics(info, device=self.engine.device, top_k=self.cfg.train.top_k)

    def check_tta(self, transforms: Sequence[str]) -> None:
        from kiln.algorithms.tta import check_transforms

        info = self.data.info
        check_transforms(transforms, info.input_shape, floating=info.task != "lm")

    def tta(self, model: nn.Module, transforms: Sequence[str]) -> nn.Module:
        from kiln.algorithms.tta import TTA

        return TTA(model, transforms, task=self.data.info.task, seed=self.cfg.seed)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        from kiln.train.trainer import evaluate

        return dict(evaluate(model, self.loader, self.loss_fn, self.engine, self.metrics))

    def add_confusion(self, model: nn.Module, result: dict[str, Any]) -> None:
        """Print the confusion matrix of ``model`` and store it in ``result`` (classification)."""
        import torch

        from kiln.train.metrics import confusion_matrix

        info = self.data.info
        if info.task != "classification" or not info.num_classes:
            return
        preds, targets = [], []
        model.eval()
        with torch.inference_mode():
            for batch in self.loader:
                x, y = self.engine.to_device(batch)
                with self.engine.autocast():
                    preds.append(model(x).argmax(-1).cpu())
                targets.append(y.cpu())
        cm = confusion_matrix(torch.cat(preds), torch.cat(targets), info.num_classes)
        names = info.class_names or [str(i) for i in range(info.num_classes)]
        _print_confusion(cm, names)
        result["confusion_matrix"] = cm.tolist()


def _eval_single(
    run_dir: Path,
    split: str,
    checkpoint: str | None,
    transforms: Sequence[str],
    *,
    trust_code: bool = False,
) -> dict[str, Any]:
    from kiln.run import CHECKPOINTS, CONFIG
    from kiln.train import build
    from kiln.train.checkpoint import resolve_checkpoint
    from kiln.train.checkpoint.weights import consolidate_checkpoint, load_model
    from kiln.trust import refuse_file_target

    s = _Setup(run_dir, split)
    s.check_tta(transforms)
    if checkpoint:
        ckpt_path = resolve_checkpoint(
            run_dir / CHECKPOINTS / checkpoint if checkpoint in ("last", "best") else checkpoint
        )
        refuse_file_target(s.cfg.model.target, run_dir / CONFIG, trust_code=trust_code)
        model = build.build_model_for(s.cfg, s.data.info)
        # sharded (FSDP2) or not
        model.load_state_dict(consolidate_checkpoint(ckpt_path, trust_code=trust_code))
    else:
        model = load_model(run_dir, trust_code=trust_code)
    model, _ = s.engine.setup(model)
    plain = s.evaluate(model)
    if not transforms:
        _print_metrics(plain, split, s.n)
        s.add_confusion(model, plain)
        (run_dir / f"eval-{split}.json").write_text(json.dumps(plain, indent=1))
        return plain

    tta_model = s.tta(model, transforms)
    metrics = s.evaluate(tta_model)
    label = "tta=" + ",".join(transforms)
    _print_table({"no TTA": plain, label: metrics}, f"{split} split ({s.n} examples)")
    s.add_confusion(tta_model, metrics)
    result = {
        "split": split,
        "examples": s.n,
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "tta": list(transforms),
        "metrics": metrics,
        "plain": plain,
    }
    _write(run_dir / f"eval-{split}-tta.json", result)
    return result


def _eval_ensemble(
    run_dirs: list[Path],
    split: str,
    transforms: Sequence[str],
    vote: bool,
    *,
    snapshots: int | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    from kiln.algorithms import ensemble as ens

    mode = "vote" if vote else "mean"
    if snapshots is None:
        # First the members must answer the same question (load_ensemble checks that), then
        # hold out the same examples: scoring members that split the data differently on one
        # run's held-out split would count their own training examples.
        combined = ens.load_ensemble(run_dirs, mode=mode, trust_code=trust_code)
        ens.check_same_split(run_dirs)
        names = [str(d) for d in run_dirs]
        what = f"ensemble of {len(run_dirs)} runs"
        kind = "ensemble"
    else:
        paths = ens.snapshot_paths(run_dirs[0], snapshots)
        combined = ens.load_snapshots(run_dirs[0], snapshots, mode=mode, trust_code=trust_code)
        names = [p.stem for p in paths]
        what = f"snapshot ensemble of {snapshots} checkpoints"
        kind = "snapshots"
    s = _Setup(run_dirs[0], split)
    s.check_tta(transforms)
    if transforms:
        combined = ens.Ensemble(
            [s.tta(m, transforms) for m in combined.members], mode=mode, task=combined.task
        )
    model, _ = s.engine.setup(combined)  # moves the members too; they stay reachable below
    members: list[dict[str, Any]] = [
        {"name": name, "metrics": s.evaluate(m)}
        for name, m in zip(names, combined.members, strict=True)
    ]
    metrics = s.evaluate(model)
    how = "majority vote" if vote else "mean probability"
    print(f"{what}, {how}" + (", TTA " + ",".join(transforms) if transforms else ""))
    _print_members(names)
    columns = {f"member {i + 1}": m["metrics"] for i, m in enumerate(members)}
    columns["ensemble"] = metrics
    _print_table(columns, f"{split} split ({s.n} examples)")
    s.add_confusion(model, metrics)
    result = {
        "split": split,
        "examples": s.n,
        "mode": mode,
        "tta": list(transforms),
        "runs": [str(d) for d in run_dirs],
        "snapshots": snapshots,
        "metrics": metrics,
        "members": members,
    }
    suffix = kind + ("-vote" if vote else "") + ("-tta" if transforms else "")
    _write(run_dirs[0] / f"eval-{split}-{suffix}.json", result)
    return result


# --------------------------------------------------------------------------- output


def _write(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def _print_metrics(metrics: dict[str, Any], split: str, n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{split} split ({n} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    Console().print(table)


def _print_table(columns: dict[str, dict[str, Any]], title: str) -> None:
    """One row per metric, one column per model; the last column is the combined one."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    first = next(iter(columns.values()))
    for k in first:
        table.add_row(k, *[f"{col[k]:.4f}" for col in columns.values()])
    Console().print(table)


def _print_members(names: list[str]) -> None:
    for i, name in enumerate(names):
        print(f"member {i + 1}: {name}")


def _print_confusion(cm: Any, names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for i, row in enumerate(cm.tolist()):
        table.add_row(
            names[i], *[f"[bold]{v}[/bold]" if j == i else str(v) for j, v in enumerate(row)]
        )
    Console().print(table)

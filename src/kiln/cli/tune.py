"""``kiln tune lr|batch CONFIG [key.sub=value ...] [tune.<option>=value ...]``.

Builds data, model, optimizer and loss exactly as ``kiln train`` would (same seed, same
Engine), runs a finder from :mod:`kiln.algorithms.finders`, and prints the value to put in the
config. The finder options are not part of the job config, so they are taken out of the
arguments before the config is loaded:

* lr: ``tune.steps=100``, ``tune.start_lr=1e-7``, ``tune.end_lr=10``, ``tune.smoothing=0.98``;
* batch: ``tune.mode=power|binary``, ``tune.budget_mb=2048``, ``tune.max_batch=4096``

(:class:`kiln.cli.options.LrFindOptions`, :class:`kiln.cli.options.BatchFindOptions`).

After a ``--`` separator the same options are also accepted as ``--steps 100`` or
``--budget-mb=2048`` (before it, the command line parser would reject them).

``kiln tune lr`` writes ``lr_find.json`` (lrs, losses, smoothed, suggestion) and
``lr_find.png`` to ``<out_dir>/<name>-lr-find/`` (replacing an earlier result).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import EXTRA_ARGS, Debug
from kiln.errors import UsageError

if TYPE_CHECKING:  # torch stays unimported until a verb runs (fast `kiln --help`)
    import torch

    from kiln.config import Config
    from kiln.train.engine import Engine

__all__ = ["command", "register", "run_tune", "split_tune_options"]


def command(
    what: Annotated[
        str, typer.Argument(help="lr (learning-rate range test) or batch (batch size)")
    ],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="CONFIG.yaml then key.sub=value overrides", show_default=False),
    ] = None,
    debug: Debug = False,
) -> None:
    """Find a learning rate (range test, plot) or the largest batch size that fits.

    Finder options: tune.steps, tune.start_lr, tune.end_lr, tune.smoothing (lr);
    tune.mode=power|binary, tune.budget_mb, tune.max_batch (batch).
    """
    from kiln.cli.errors import run_cli

    run_cli(lambda: run_tune(what, args or []), debug=debug)


def register(app: typer.Typer) -> None:
    """Add ``kiln tune`` to ``app``."""
    app.command("tune", context_settings=EXTRA_ARGS)(command)


def _take(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The ``tune.<name>=value``, ``--name value`` and ``--name=value`` words, and the rest."""
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("tune.") and "=" in arg:
            name, text = arg[len("tune.") :].split("=", 1)
        elif arg.startswith("--") and len(arg) > 2:
            name, eq, text = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{arg} needs a value, e.g. {arg} 100")
                i += 1
                text = args[i]
        else:
            rest.append(arg)
            i += 1
            continue
        values[name.strip().replace("-", "_")] = text.strip()
        i += 1
    return values, rest


def split_tune_options(what: str, args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Take the finder options out of ``args``; return them (with defaults) and the rest.

    The options are :class:`kiln.cli.options.LrFindOptions` for ``lr`` and
    :class:`kiln.cli.options.BatchFindOptions` for ``batch``.

    Raises:
        kiln.errors.UsageError: an unknown option, one of the other finder, or a bad value;
            the message names the option, the allowed values and the closest option name.

    Example:
        >>> split_tune_options("lr", ["c.yaml", "tune.steps=50", "optim.lr=1"])[0]["steps"]
        50
    """
    from kiln.cli.options import BatchFindOptions, LrFindOptions, VerbOptions, parse_options

    values, rest = _take(args)
    finders: dict[str, type[VerbOptions]] = {"lr": LrFindOptions, "batch": BatchFindOptions}
    model = finders[what]
    for key in values:
        other = next((v for v, m in finders.items() if v != what and key in m.model_fields), None)
        if key not in model.model_fields and other is not None:
            raise UsageError(f"tune.{key} applies to 'kiln tune {other}', not 'kiln tune {what}'")
    return parse_options(model, "tune", values).model_dump(), rest


def run_tune(what: str, args: list[str]) -> None:
    """Run the finder ``what`` (``lr`` or ``batch``) on the job ``args`` describes."""
    if what not in ("lr", "batch"):
        raise ValueError(
            f"unknown tune target {what!r}; use 'kiln tune lr CONFIG' (learning rate) or "
            "'kiln tune batch CONFIG' (batch size)"
        )
    opts, rest = split_tune_options(what, args)
    from kiln.cli.train import split_args
    from kiln.config import load_config

    path, overrides = split_args(rest)
    cfg = load_config(Path(path) if path else None, overrides)
    # Kineto prints two lines per profile on stderr unless told otherwise (read once, at the
    # first profile); the batch finder profiles every trial on the CPU.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from kiln.train import build
    from kiln.train.optim import build_optimizer
    from kiln.train.reproducibility import seed_everything, set_deterministic

    seed_everything(cfg.seed)  # the same initial weights as `kiln train` with this config
    set_deterministic(cfg.deterministic)
    data = build.build_data_for(cfg)
    engine = build.engine_for(cfg)
    if engine.world.size > 1:
        engine.close()
        raise ValueError("kiln tune runs in one process; run it without torchrun")
    try:
        model, _ = engine.setup(build.build_model_for(cfg, data.info))
        optimizer = build_optimizer(engine.model, cfg.optim)  # type: ignore[arg-type]
        loss_fn = build.loss_for(cfg, data)
        if what == "lr":
            loader = build.loader_for(cfg, data.train, train=True, device=engine.device)
            _tune_lr(cfg, opts, model, optimizer, loader, loss_fn, engine)
        else:
            _tune_batch(opts, model, optimizer, data.train, loss_fn, engine)
    finally:
        engine.close()


def _tune_lr(
    cfg: Config,
    opts: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Any],
    loss_fn: Callable[..., torch.Tensor],
    engine: Engine,
) -> None:
    from kiln.algorithms.finders import lr_find

    result = lr_find(
        model,
        optimizer,
        loader,
        loss_fn,
        start_lr=opts["start_lr"],
        end_lr=opts["end_lr"],
        num_steps=opts["steps"],
        smoothing=opts["smoothing"],
        engine=engine,
    )
    out = Path(cfg.out_dir) / f"{cfg.name}-lr-find"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **result.to_dict(),
        "start_lr": opts["start_lr"],
        "end_lr": opts["end_lr"],
        "num_steps": opts["steps"],
        "smoothing": opts["smoothing"],
        "optimizer": cfg.optim.name,
        "batch_size": cfg.data.batch_size,
        "configured_lr": cfg.optim.lr,
    }
    data = out / "lr_find.json"
    data.write_text(json.dumps(record, indent=1))
    if result.suggestion is None or not result.lrs:
        raise ValueError(
            f"the loss was not finite from the first step (lr {opts['start_lr']:g}): no "
            f"suggestion; lower tune.start_lr or check the data ({data})"
        )
    stop = "stopped: the loss diverged" if result.stopped_early else "reached tune.end_lr"
    print(f"{len(result.lrs)} steps, lr {opts['start_lr']:.3g} to {result.lrs[-1]:.3g} ({stop})")
    print(
        f"suggested learning rate: {result.suggestion:.3g} (steepest fall of the smoothed loss; "
        f"its minimum is at {result.lr_at_min:.3g})"
    )
    if cfg.train.accumulate > 1:
        print(
            f"note: the sweep used one batch of {cfg.data.batch_size} per update, not "
            f"train.accumulate={cfg.train.accumulate} of them"
        )
    print(f"use optim.lr={result.suggestion:.2g}  (configured: optim.lr={cfg.optim.lr:g})")
    try:
        plot = result.plot(out / "lr_find.png")
    except ImportError as exc:  # the numbers above do not need the optional plotting library
        print(f"plot skipped: {exc}")
        plot = None
    print(f"wrote {data}" + (f" and {plot}" if plot else ""))


def _tune_batch(
    opts: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Any,
    loss_fn: Callable[..., torch.Tensor],
    engine: Engine,
) -> None:
    from torch import nn

    from kiln.algorithms.finders import batch_find

    budget = None if opts["budget_mb"] is None else int(opts["budget_mb"] * 2**20)
    # Training-mode BatchNorm1d cannot normalise a single sample: start such models at 2.
    norms = nn.modules.batchnorm._BatchNorm
    start = 2 if any(isinstance(m, norms) for m in model.modules()) else 1
    if engine.device.type == "cpu" and budget is None:
        print("no memory budget (tune.budget_mb): on the CPU the search runs to the cap")
    result = batch_find(
        model,
        optimizer,
        dataset,
        loss_fn,
        mode=opts["mode"],
        budget_bytes=budget,
        max_batch=opts["max_batch"],
        start=min(start, opts["max_batch"] or start),
        engine=engine,
    )
    for t in result.trials:
        peak = "" if t.peak_bytes is None else f"  peak {t.peak_bytes / 2**20:.2f} MiB"
        print(f"batch {t.batch_size:>6}  {t.reason:<13}{peak}")
    capped = (
        " (the cap: dataset size or tune.max_batch)"
        if result.batch_size == result.max_batch
        else ""
    )
    print(f"largest batch size that fits: {result.batch_size}{capped}")
    print(f"use data.batch_size={result.batch_size}")

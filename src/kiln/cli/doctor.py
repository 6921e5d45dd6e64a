"""``kiln doctor CONFIG|RUN [key.sub=value ...]``: check a job's training loop for mistakes.

Builds data, model, optimizer, loader and loss exactly as ``kiln train`` would (same seed, same
Engine), then runs :func:`kiln.doctor.steps.check` over a few steps of Kiln's own training step
(the Trainer's micro-step: forward and loss under autocast, scaled backward, finite check,
unscale -> clip -> step -> zero_grad) and an evaluation of the same batches, plus the static
checks of the model, optimizer, loader and config. Each finding is printed with what, where,
why, the fix and the measured cost; findings are advice, so the exit code is 0. Nothing is
written: no run directory is created. A Python script is not run: its loop is checked from
inside it with :func:`kiln.doctor.steps`, and the error message shows the two lines to add.

Example:
    >>> from kiln.config import load_config
    >>> cfg = load_config("configs/digits_mlp.yaml", ["data.batch_size=32"])  # doctest: +SKIP
    >>> findings, ran = doctor_config(cfg)                  # doctest: +SKIP
    >>> findings                                            # doctest: +SKIP
    []
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.common import EXTRA_ARGS, RUN_OR_CONFIG, Debug, TrustCode

if TYPE_CHECKING:  # torch stays unimported until the verb runs (fast `kiln --help`)
    from kiln.config import Config
    from kiln.doctor.findings import Finding


def command(
    args: Annotated[list[str], typer.Argument(help=RUN_OR_CONFIG, show_default=False)],
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Find common training mistakes: what, where, why it matters, how to fix, measured cost."""
    from kiln.cli.errors import run_cli

    run_cli(lambda: run_doctor(args, trust_code=trust_code), debug=debug)


def register(app: typer.Typer) -> None:
    """Add ``kiln doctor`` to ``app``."""
    app.command("doctor", context_settings=EXTRA_ARGS)(command)


#: What ``kiln doctor SCRIPT.py`` answers: a script's loop is the user's own code, so it is
#: checked from inside the script, where its model, loader and step exist.
SCRIPT_HINT = (
    "kiln doctor reads a YAML config or a run directory, not a Python script ({path}); check "
    "the script's own loop from Python, after its model, loader and step function are built:\n"
    "  from kiln.doctor import check\n"
    "  print(*check(model, loader, step_fn, optimizer=optimizer), sep='\\n\\n')"
)


def load_job(args: list[str], *, trust_code: bool = False) -> Config:
    """The config ``args`` name: a YAML file or a run directory's ``config.yaml``, + overrides.

    Raises:
        kiln.errors.UsageError: ``args`` names a Python script (the message shows how to check
            it with :func:`kiln.doctor.steps`).

    Example:
        >>> load_job(["train.epochs=2"]).train.epochs
        2
    """
    from kiln.cli import profile
    from kiln.cli.train import split_args
    from kiln.errors import UsageError

    path, _ = split_args(args)
    if path is not None and Path(path).suffix == ".py":
        raise UsageError(SCRIPT_HINT.format(path=path))
    cfg: Config = profile.load_job(args, trust_code=trust_code)[0]
    return cfg


def doctor_config(cfg: Config, *, steps: int | None = None) -> tuple[list[Finding], str]:
    """Run the doctor on Kiln's own loop for ``cfg``; returns the findings and what ran.

    Args:
        cfg: the job.
        steps: training micro-steps to watch (default: 3, or enough for two updates under
            gradient accumulation).

    Raises:
        ValueError: a config the supervised loop cannot run (``meta.enabled``), or several
            processes (run it without torchrun).
    """
    if cfg.meta.enabled:
        raise ValueError(
            "kiln doctor checks the supervised training loop; meta.enabled=true runs the "
            "meta-learning loop (set meta.enabled=false)"
        )
    from kiln.data.loader import start_epoch
    from kiln.doctor.steps import check
    from kiln.train import build
    from kiln.train.metrics import build_metrics
    from kiln.train.optim import build_optimizer
    from kiln.train.reproducibility import seed_everything, set_deterministic
    from kiln.train.techniques import Techniques, check_techniques
    from kiln.train.trainer import evaluate

    seed_everything(cfg.seed)  # the same initial weights and batches as `kiln train`
    if cfg.deterministic:  # off is torch's default (and switching it off imports the compiler)
        set_deterministic(True)
    data = build.build_data_for(cfg)
    engine = build.engine_for(cfg)
    try:
        if engine.world.size > 1:
            raise ValueError("kiln doctor runs in one process; run it without torchrun")
        info = data.info
        check_techniques(cfg, info, strategy=engine.strategy, world=1)
        model = build.build_model_for(cfg, info)
        if cfg.train.activation_checkpointing:
            from kiln.algorithms.activation_checkpointing import apply_activation_checkpointing

            targets = cfg.train.activation_checkpointing
            apply_activation_checkpointing(model, None if targets is True else targets)
        tech = Techniques(cfg, info, model, epochs=cfg.train.epochs)
        freezer = tech.freezer
        if freezer is not None and not freezer.dynamic:
            freezer.apply(model, epoch=0)
        wrapped, _ = engine.setup(model)
        optimizer = build_optimizer(model, cfg.optim)
        if freezer is not None and freezer.dynamic:
            freezer.apply(model, epoch=0)
        loader = build.loader_for(cfg, data.train, train=True, device=engine.device)
        start_epoch(loader, 0)
        loss_fn = build.loss_for(cfg, data)
        metrics = build_metrics(info, device=engine.device, top_k=cfg.train.top_k)
        if freezer is not None:
            freezer.train_mode(model)
        else:
            wrapped.train()
        n_batches = len(loader)
        counter = itertools.count()

        def kiln_step(batch: Any) -> None:
            """The Trainer's micro-step and, when it ends a group, its update."""
            i = next(counter)
            x, y = engine.to_device(batch)
            if tech.mixer is not None:
                x, y = tech.mixer(x, y, epoch=0)
            with engine.micro_step(i, n_batches) as update:
                with engine.autocast():
                    loss = loss_fn(wrapped(x), y)
                engine.backward(loss)
            if not update:
                return
            if cfg.train.nonfinite != "ignore" and not engine.grads_finite(optimizer, loss):
                optimizer.zero_grad(set_to_none=True)
                return
            engine.optimizer_step(optimizer)

        def kiln_eval(batch: Any) -> None:
            evaluate(wrapped, [batch], loss_fn, engine, metrics)

        steps = steps or max(3, 2 * cfg.train.accumulate + 1)
        findings = check(
            wrapped,
            loader,
            kiln_step,
            optimizer=optimizer,
            eval_fn=kiln_eval,
            scaler=engine.precision.scaler,
            steps=steps,
            config=cfg,
        )
        ran = (
            f"{min(steps, n_batches)} steps of kiln's training step and an evaluation of the "
            f"same batches, on {engine.device} ({cfg.precision}, batch {cfg.data.batch_size}, "
            f"{type(model).__name__})"
        )
    finally:
        engine.close()
    return findings, ran


def run_doctor(args: list[str], *, trust_code: bool = False) -> None:
    """``kiln doctor``: print the findings for the job ``args`` names (exit code 0)."""
    from kiln.doctor.findings import format_report

    cfg = load_job(args, trust_code=trust_code)
    findings, ran = doctor_config(cfg)
    print(f"kiln doctor: {cfg.name}: {ran}", flush=True)
    if not findings or not sys.stdout.isatty():
        print(format_report(findings))
        return
    _print_table(findings)


def _print_table(findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {"error": "red", "warning": "yellow", "info": "blue"}
    table = Table(show_lines=True)
    for name in ("", "finding", "why", "fix", "cost"):
        table.add_column(name, overflow="fold")
    for f in findings:
        table.add_row(
            f"[{colour.get(f.severity, 'white')}]{f.severity}[/]",
            f"[bold]{f.code}[/]: {f.what}\n[dim]{f.where}[/]",
            f.why,
            f.fix,
            f.cost or "",
        )
    console = Console()
    console.print(table)
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))

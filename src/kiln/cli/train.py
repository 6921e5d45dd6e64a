"""``kiln train CONFIG [key.sub=value ...]``: the command, and the run it starts.

Torch is imported inside the functions, so ``kiln --help`` stays fast.

Example:
    >>> split_args(["configs/digits.yaml", "optim.lr=0.1"])
    ('configs/digits.yaml', ['optim.lr=0.1'])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from kiln.cli.common import Debug, TrustCode

__all__ = ["command", "register", "run_train", "split_args"]


def command(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="CONFIG.yaml then key.sub=value overrides", show_default=False),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="print the resolved config and exit")
    ] = False,
    trust_code: TrustCode = False,
    debug: Debug = False,
) -> None:
    """Train a model from a YAML config plus key.sub=value overrides."""
    from kiln.cli.errors import run_cli

    run_cli(
        lambda: run_train(args or [], print_config=print_config, trust_code=trust_code),
        debug=debug,
    )


def register(app: typer.Typer) -> None:
    """Add ``kiln train`` to ``app``."""
    app.command("train")(command)


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """First argument is the config file unless it is an override (contains '=')."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def run_train(args: list[str], *, print_config: bool = False, trust_code: bool = False) -> None:
    from kiln.config import dump_config, load_config

    path, overrides = split_args(args)
    found = None if path else _resumed_config(overrides)
    cfg = load_config(Path(path) if path else found, overrides)
    if found is not None:
        from kiln.trust import refuse_file_target

        # The run's own config.yaml was read because no config was given: an import path in it
        # is the file's choice, not the user's, unless they name it or opt in.
        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("model.target=")]
        refuse_file_target(cfg.model.target, found, trust_code=trust_code, chosen=chosen)
    if print_config:
        print(dump_config(cfg), end="")
        return
    if cfg.meta.enabled:
        from kiln.meta.runner import run_meta

        run_meta(cfg)  # prints the MAML vs baseline table and the run directory
        return
    from kiln.train.trainer import Trainer

    result = Trainer(cfg).fit()
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.test.items())
    if "acc" in result.test:
        print(f"test accuracy: {result.test['acc'] * 100:.2f}%")
    if shown:
        print(f"test metrics: {shown}")
    print(f"run directory: {result.run_dir}")


def _resumed_config(overrides: list[str]) -> Path | None:
    """``kiln train resume=RUN ...`` without a config file continues with the run's own config."""
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if not resume:
        return None
    from kiln.run import CONFIG
    from kiln.train.resume_policy import resume_source

    _, run_dir = resume_source(resume)
    found = run_dir / CONFIG if run_dir is not None else None
    return found if found is not None and found.is_file() else None

"""``kiln``: the console entry point; it assembles the verbs into one app.

Each verb module (``kiln.cli.<verb>``) owns its command (arguments, options, help) and adds it
with ``register(app)``; this module holds only what is global: the app, ``--version``, and the
order of the verbs in ``kiln --help``. Errors are mapped to one line and an exit code by
:func:`kiln.cli.errors.run_cli`, which every command runs its work in (``--debug`` for the
traceback). Verbs import torch lazily, so ``--help`` stays fast.

Example:
    >>> from typer.testing import CliRunner
    >>> print(CliRunner().invoke(app, ["--version"]).output.strip())
    kiln 0.1.0
"""

from __future__ import annotations

from typing import Annotated

import typer

from kiln import __version__
from kiln.cli import (
    bench,
    consolidate,
    doctor,
    env,
    export,
    inspect,
    profile,
    prune,
    quantize,
    serve,
    train,
    tune,
)
from kiln.cli import eval as eval_

app = typer.Typer(
    name="kiln",
    help="Advanced PyTorch techniques that work together, on your own model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"kiln {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Kiln command line."""


# The order of `kiln --help`.
_VERBS = (
    train,
    eval_,
    tune,
    consolidate,
    export,
    serve,
    quantize,
    prune,
    inspect,
    profile,
    doctor,
    bench,
    env,
)
for _verb in _VERBS:
    _verb.register(app)


def main() -> None:
    """Run the app; a usage error (unknown option, bad value) is one line and exit 2.

    typer would draw a box around it; every other Kiln error is one ``error:`` line.
    """
    import sys

    try:
        code = app(standalone_mode=False, prog_name="kiln")
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as exc:  # click's usage errors (typer's vendored click)
        exit_code = getattr(exc, "exit_code", 2)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `kiln` or `kiln VERB`: the help
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exit_code)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "kiln"
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {where}: {text} (see `{where} -h`)", file=sys.stderr)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)

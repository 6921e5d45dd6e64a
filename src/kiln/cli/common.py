"""Command-line options that several verbs share, declared once (typer only, no torch).

Each verb module (``kiln.cli.<verb>``) owns its command: its arguments, options and help, in a
``command`` function, and a ``register(app)`` that adds it to the ``kiln`` app. The options
every verb that reads files or runs code has in common live here, so ``--trust-code`` and
``--debug`` read the same everywhere.

Example:
    >>> from typer.testing import CliRunner
    >>> app = typer.Typer()
    >>> @app.command()
    ... def demo(trust_code: TrustCode = False, debug: Debug = False) -> None:
    ...     print(f"trust_code={trust_code} debug={debug}")
    >>> print(CliRunner().invoke(app, ["--debug"]).output.strip())
    trust_code=False debug=True
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

__all__ = ["EXTRA_ARGS", "RUN_OR_CONFIG", "Debug", "TrustCode"]

#: ``--debug``: the traceback of an error as well as its one line (see :mod:`kiln.cli.errors`).
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]

#: ``--trust-code``: let the files a verb reads name code to import or unpickle.
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="allow code that the files name: a model.target import path in the run's config, "
        "weights or checkpoint, and a .pt2 that unpickles on loading. Only for files you trust, "
        "e.g. your own run trained with model.target=pkg.module:Net",
    ),
]

#: Help of the positional arguments of the verbs that take a job (inspect, profile, doctor, bench).
RUN_OR_CONFIG = "RUN directory or CONFIG.yaml, then key.sub=value overrides"

#: Context of a verb that passes ``key=value`` and ``<verb>.<option>=value`` words through.
EXTRA_ARGS: dict[str, Any] = {"ignore_unknown_options": True, "allow_extra_args": True}

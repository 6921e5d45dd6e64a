"""One place that turns expected failures into one clear line and exit code 2.

Bad input (config, files, checkpoints, data) is the user's to fix: they get the message, not a
traceback; ``--debug`` (or ``KILN_DEBUG=1``) shows the traceback too. Anything unexpected is a
bug: it still prints one line, says so, and exits 1.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _expected() -> tuple[type[BaseException], ...]:
    from kiln.config import ConfigError

    kinds: list[type[BaseException]] = [
        ConfigError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ImportError,
        TypeError,
    ]
    if "kiln.train.checkpoint" in sys.modules:
        from kiln.train.checkpoint import CheckpointError

        kinds.append(CheckpointError)
    if "kiln.train.guard" in sys.modules:
        from kiln.train.guard import NonFiniteError

        kinds.append(NonFiniteError)
    return tuple(kinds)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_cli(fn: Callable[[], Any], *, debug: bool) -> Any:
    """Run ``fn``; map known errors to one line on stderr and an exit code."""
    debug = debug or os.environ.get("KILN_DEBUG") == "1"
    try:
        return fn()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BaseException as exc:
        if debug:
            traceback.print_exc()
        if "kiln.train.trainer" in sys.modules:
            from kiln.train.trainer import TrainingInterrupted

            if isinstance(exc, TrainingInterrupted):
                print(
                    f"stopped by {exc.reason}: checkpoint saved to {exc.checkpoint}\n"
                    f"resume with: kiln train {exc.run_dir / 'config.yaml'} resume={exc.run_dir}",
                    file=sys.stderr,
                    flush=True,
                )
                raise SystemExit(EXIT_INTERRUPTED) from None
        if isinstance(exc, _expected()):
            msg = str(exc).strip() or type(exc).__name__
            if isinstance(exc, (FileNotFoundError, PermissionError)) and exc.filename:
                msg = f"{exc.strerror or msg}: {exc.filename}"
            fail(msg.replace("\n", "\n  "))
        first = (str(exc).strip().splitlines() or [""])[0]
        fail(
            f"unexpected {type(exc).__name__}: {first} (this is a bug in Kiln or a user model; "
            "rerun with --debug for the traceback)",
            code=1,
        )

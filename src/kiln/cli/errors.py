"""One place that turns expected failures into one clear line and exit code 2.

Bad input (config, files, checkpoints, data, disk, ports) is the user's to fix: it arrives as a
:class:`kiln.errors.KilnError` (or an ``OSError`` naming a file, or a disk-full error) and the user
gets the message, not a traceback; ``--debug`` (or ``KILN_DEBUG=1``) shows the traceback too.
Anything unexpected is a bug: it still prints one line, says so, and exits 1.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


_KILN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: OSError numbers that mean the disk, not Kiln, is at fault; message and fix for each.
_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}


def _raised_by_kiln(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is Kiln's own code.

    Kiln's ``ValueError``/``TypeError``/``ImportError`` messages are written for the user (the
    bad value and the fix); the same types raised deep inside torch or numpy are not, and mean
    that Kiln passed something wrong: a bug. New code raises a :class:`kiln.errors.KilnError`
    subclass instead, which needs no such guess.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_KILN_DIR + os.sep)


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error that is the user's to fix, or None for a bug."""
    from kiln.errors import KilnError

    if isinstance(exc, KilnError):
        return str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (
            f"{_DISK_ERRNOS[exc.errno]}{where}: free space or choose another folder "
            "(out_dir=...); files written before this one are intact"
        )
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        if exc.filename:
            return f"{exc.strerror or exc}: {exc.filename}"
        return str(exc).strip() or type(exc).__name__
    if isinstance(exc, (ValueError, TypeError, ImportError)) and _raised_by_kiln(exc):
        return str(exc).strip() or type(exc).__name__
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read (a config or file with thousands of levels)"
    return None


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
        msg = user_message(exc)
        if msg is not None:
            fail(msg.replace("\n", "\n  "))
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        fail(
            f"unexpected {type(exc).__name__}: {first} (this is a bug in Kiln or in a user model; "
            "rerun with --debug for the traceback and please report it)",
            code=1,
        )

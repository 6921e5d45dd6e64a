"""Why a model could not be exported, in one line that names the user's own line of code.

``torch.export`` (and the ONNX exporter, which starts with it) fails on models whose
``forward`` branches on a tensor's value (``if x.sum() > 0:``), calls ``.item()``, or uses an
op it cannot trace. Torch then prints the partial graph and several log lines to stderr and
raises an exception whose message runs to dozens of lines. :func:`quiet_export` keeps that
output away from the user; :func:`explain_export_failure` turns the exception into a
:class:`kiln.errors.ModelError` that says which line of the user's code stopped the export
(``file:line`` and the source text, from the traceback or torch's own report) and which format
works instead.

Example:
    >>> err = explain_export_failure(RuntimeError("no"), "exported")
    >>> type(err).__name__
    'RuntimeError'
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from kiln.errors import ModelError

__all__ = [
    "explain_export_failure",
    "no_treespec_warning",
    "quiet_export",
    "quiet_loggers",
    "user_line",
]

_KILN_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_STDLIB_DIR = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep
# torch's report of where its trace stopped: 'File "/x/model.py", line 12, in forward'.
_REPORTED = re.compile(r'File "([^"]+)", line (\d+), in \S+')


def _torch_dir() -> str:
    import torch

    return str(Path(torch.__file__).resolve().parent) + os.sep


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence torch's own report of a failed export while the block runs.

    ``torch.export`` prints the partial graph straight to ``sys.stderr`` and logs warnings and
    errors through the ``torch.*`` loggers (whose handler holds the real stderr, so redirecting
    ``sys.stderr`` alone does not reach them). Both are muted inside the block; the exception
    itself carries everything :func:`explain_export_failure` needs. When the block succeeds,
    what was written to ``sys.stderr`` (a Python warning, say) is passed on after all.
    """
    loggers = [logging.getLogger("torch")]
    loggers += [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
        sys.stderr.write(captured.getvalue())
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def quiet_loggers(names: Iterable[str]) -> Iterator[None]:
    """Raise the given loggers to ERROR inside the block and restore their levels after it.

    For the info lines an exporter or a library logs on every call (the dynamo ONNX exporter's
    "torchvision is not installed", torchao's kernels it cannot load on a CPU build).

    Example:
        >>> with quiet_loggers(["torch.onnx"]):
        ...     pass
    """
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def no_treespec_warning() -> Iterator[None]:
    """Ignore torch's own pytree deprecation, raised inside its deep copies of exported graphs.

    ``copy.deepcopy`` of a module call graph (``ExportedProgram.run_decompositions``, which the
    ONNX exporter calls, or of an exported ``GraphModule``) trips torch 2.13's FutureWarning
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and
    treespec.is_leaf()` instead." in torch's code, not ours.

    Example:
        >>> with no_treespec_warning():
        ...     pass
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
        )
        yield


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (each once)."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_user_file(filename: str, torch_dir: str) -> bool:
    path = os.path.abspath(filename)
    return not (
        path.startswith((torch_dir, _KILN_DIR, _STDLIB_DIR))
        or filename.startswith("<")
        or f"{os.sep}site-packages{os.sep}torch" in path
    )


def user_line(exc: BaseException) -> tuple[str, str] | None:
    """``(file:line, source text)`` of the innermost line of the user's code behind ``exc``.

    Looks through the tracebacks of ``exc`` and its causes (the frames that ran the user's
    ``forward``), then through torch's own "The following call raised this error" report in
    the messages (strict tracing, where no user frame is on the Python stack). Frames of
    torch, Kiln and the standard library are skipped.

    Example:
        >>> user_line(ValueError("nothing to see")) is None
        True
    """
    torch_dir = _torch_dir()
    chain = _chain(exc)
    for e in reversed(chain):  # the innermost cause first: it ran closest to the user's code
        tb: TracebackType | None = e.__traceback__
        found = None
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if _is_user_file(filename, torch_dir):
                found = (filename, tb.tb_lineno)
            tb = tb.tb_next
        if found is not None:
            return _describe(*found)
    for e in chain:
        hits = [m for m in _REPORTED.finditer(str(e)) if _is_user_file(m.group(1), torch_dir)]
        if hits:
            return _describe(hits[-1].group(1), int(hits[-1].group(2)))
    return None


def _describe(filename: str, line: int) -> tuple[str, str]:
    shown = os.path.relpath(filename) if Path(filename).is_relative_to(os.getcwd()) else filename
    return f"{shown}:{line}", linecache.getline(filename, line).strip()


def explain_export_failure(exc: BaseException, format: str) -> BaseException:
    """The error to raise for a failed ``torch.export``/ONNX capture of the user's model.

    Returns a :class:`~kiln.errors.ModelError` naming the user's line (see :func:`user_line`),
    what went wrong there in a few words, and the format that still works
    (``--format torchscript``: scripting keeps Python control flow). When no line of the
    user's code is involved (Kiln's own model failed), ``exc`` comes back unchanged: that is a
    bug to report, not the user's to fix.

    Args:
        exc: what ``torch.export.export`` or ``torch.onnx.export`` raised.
        format: the format asked for (``exported`` or ``onnx``).

    Example:
        >>> explain_export_failure(KeyError("x"), "onnx")
        KeyError('x')
    """
    where = user_line(exc)
    if where is None:
        return exc
    site, code = where
    names = {type(e).__name__ for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc)).lower()
    if any("DataDependent" in n for n in names) or "data-dependent" in text:
        why = (
            "branches on (or reads) a tensor's value, which a captured graph cannot hold "
            "(data-dependent control flow)"
        )
        rewrite = "or rewrite that line with torch.where / torch.cond"
    else:
        inner = _chain(exc)[-1]
        first = (str(inner).strip().splitlines() or [type(inner).__name__])[0][:160]
        why = f"stops torch.export ({type(inner).__name__}: {first})"
        rewrite = "or change that line"
    label = {"exported": "torch.export (--format exported)", "onnx": "ONNX (--format onnx)"}
    shown = f" ({code})" if code else ""
    return ModelError(
        f"the model cannot be exported to {label.get(format, format)}: {site}{shown} {why}; "
        f"export it with --format torchscript, {rewrite}"
    )

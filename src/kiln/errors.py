"""The errors that mean "the user's input is wrong": one family, so the CLI can tell them from bugs.

Every place that reads something the user gave Kiln (a config, a data file, a model class, a
checkpoint or weights file, a disk location, a network port) raises a subclass of
:class:`KilnError` when that input is wrong. The message names the thing and says how to fix it.
The CLI prints such an error as one line and exits 2; anything else is a bug in Kiln (exit 1,
"please report"). Each class also derives from the builtin a caller would expect (``ValueError``,
``RuntimeError``, ``OSError``), so ``except ValueError`` in user code keeps working.

This module imports nothing heavy: ``kiln --help`` stays fast.

Example:
    >>> try:
    ...     raise CorruptFileError("weights.safetensors is truncated (read 10 of 400 bytes)")
    ... except KilnError as exc:
    ...     print(exc.kind, "-", exc)
    corrupt file - weights.safetensors is truncated (read 10 of 400 bytes)
"""

from __future__ import annotations

__all__ = [
    "CorruptFileError",
    "DataError",
    "DiskError",
    "KilnError",
    "ModelError",
    "NotSupportedError",
    "PortError",
    "UnsafeFileError",
    "UsageError",
    "short_repr",
]


class KilnError(Exception):
    """Base of every error caused by the user's input; the CLI prints it in one line, exit 2."""

    #: A short noun for the kind of input at fault, shown by tools that group errors.
    kind = "input"


class UsageError(KilnError, ValueError):
    """A value passed to Kiln (argument, option, override) is out of range or inconsistent."""

    kind = "usage"


class DataError(KilnError, ValueError):
    """A data file or dataset is unreadable, malformed or inconsistent."""

    kind = "data"


class ModelError(KilnError, ValueError):
    """A model cannot be built, loaded or run as configured (wrong class, kwargs or shapes)."""

    kind = "model"


class CorruptFileError(KilnError, ValueError):
    """A file is damaged: truncated, bad header, wrong format, missing keys."""

    kind = "corrupt file"


class UnsafeFileError(KilnError, ValueError):
    """A file would run code or import something the user did not choose; refused unread."""

    kind = "unsafe file"


class DiskError(KilnError, OSError):
    """Writing failed for a reason of the disk (full, read-only, missing folder)."""

    kind = "disk"


class PortError(KilnError, ValueError):
    """A host or port cannot be used (out of range, not an address, already taken)."""

    kind = "port"


class NotSupportedError(KilnError, NotImplementedError):
    """A combination Kiln does not support yet; the message says what works instead."""

    kind = "not supported"


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, safe for values of any size.

    Containers are summarised by type and length *before* ``repr`` is called, so a huge or deeply
    aliased value (a YAML alias bomb) costs nothing to describe.

    Example:
        >>> short_repr([0] * 10**6)
        'list of 1000000 items'
        >>> short_repr("x" * 200, limit=10)
        "'xxxxxx..."
    """
    if isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) > 16:
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, (list, tuple, dict)) and _nested(value, 3):
        return f"{type(value).__name__} of {len(value)} items (nested)"
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[: 4 * limit]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nested(value: object, depth: int) -> bool:
    """True when ``value`` holds containers deeper than ``depth`` levels."""
    if depth == 0:
        return isinstance(value, (list, tuple, dict))
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple, type({}.values()))):
        return False
    return any(
        _nested(v, depth - 1) for v in list(items)[:16] if isinstance(v, (list, tuple, dict))
    )

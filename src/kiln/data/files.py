"""Reading a user's data files: checks and decoding that end in one clear :class:`DataError`.

Why one module: every file-backed source (CSV, text, TSV, image folders) must say the same
things the same way when a file is missing, is not a regular file, or is not UTF-8. A decoding
error from the standard library names neither the file nor the fix (and the CLI treats a raw
``UnicodeDecodeError`` from outside Kiln as a bug), so each is turned into a
:class:`~kiln.errors.DataError` here, with the byte offset, the line and the encoding fix.

Example:
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as f:
    ...     _ = f.write(b"a,b\\n1,\\xe92\\n")
    >>> try:
    ...     read_utf8(f.name, "CSV file")
    ... except DataError as exc:
    ...     print(str(exc).split(": ", 1)[1][:36])
    byte 6 (line 2) is 0xe9 (invalid con
    >>> os.unlink(f.name)
"""

from __future__ import annotations

import codecs
from pathlib import Path

from kiln.errors import DataError

__all__ = ["DataError", "read_utf8", "require_file"]

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a :class:`Path` when it is a regular file; else a :class:`DataError`.

    Args:
        path: the file the config names (``data.path``).
        what: how the message calls it (``"CSV file"``, ``"text file"``).

    Raises:
        DataError: missing, a folder, or not a regular file (a device or pipe such as
            ``/dev/zero``, which would be read forever).

    Example:
        >>> require_file("no/such.csv", "CSV file")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        kiln.errors.DataError: CSV file not found: no/such.csv (resolved: ...); fix data.path
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        problem = "is a folder, not a file"
    elif p.exists():
        problem = "is not a regular file (a device, pipe or socket)"
    else:
        problem = "not found"
    raise DataError(f"{what} {problem}: {p} (resolved: {p.resolve()}); fix data.path")


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped).

    Args:
        path: the file.
        what: how the message calls it (``"CSV file"``, ``"text file"``).

    Returns:
        The decoded text; line endings are left as they are (``csv`` handles ``\\r\\n``).

    Raises:
        DataError: the file is missing or not a regular file, or its bytes are not UTF-8: the
            message gives the byte offset and line of the first bad byte and the re-encoding
            command (UTF-16 files, as some spreadsheet programs save them, are named as such).
    """
    p = require_file(path, what)
    data = p.read_bytes()
    if data.startswith(_UTF16_BOMS):
        raise DataError(
            f"{what} {p} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; "
            f"re-save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 {p.name} > fixed-{p.name})"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        # UTF-8 text never holds NUL bytes; UTF-16 without a byte-order mark decodes "fine" as
        # UTF-8 (every other byte NUL) and would surface later as baffling column names.
        raise DataError(
            f"{what} {p} is not UTF-8 text: byte {nul} (line {line}) "
            "is a NUL byte, so it is binary or UTF-16 text; re-save it as UTF-8 (from UTF-16: "
            f"iconv -f UTF-16 -t UTF-8 {p.name} > fixed-{p.name})"
        )
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{what} {p} is not UTF-8 text: byte {offset} (line {line}) is 0x{data[offset]:02x} "
            f"({exc.reason}); re-save it as UTF-8 (from Latin-1/Windows-1252: "
            f"iconv -f CP1252 -t UTF-8 {p.name} > fixed-{p.name})"
        ) from None

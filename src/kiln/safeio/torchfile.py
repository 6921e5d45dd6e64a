"""Read ``torch.save`` files without running code and without unpacking a bomb.

``torch.load(weights_only=True)`` already refuses pickles that import anything outside its
allow-list. Two gaps remain, closed here:

* **Size.** A ``torch.save`` file is a zip archive; torch allocates each member by its *declared*
  size. A 4.5 MB file whose deflated members declare 1 GiB makes ``torch.load`` allocate 1 GiB.
  :func:`check_archive` reads the zip's central directory first (no member is unpacked) and
  refuses an archive that would unpack past :func:`unpacked_limit`. ``torch.save`` stores members
  uncompressed, so a genuine file unpacks to about its own size.
* **Messages.** torch's errors on a damaged file range from ``IndexError: pop from empty list`` to
  a long note about ``weights_only`` defaults. :func:`torch_load` turns them into one line that
  says *corrupt* (damaged, not a torch file) or *unsafe* (would import ``module.name``).

Example:
    >>> import tempfile, torch
    >>> p = tempfile.mktemp(suffix=".pt")
    >>> torch.save({"w": torch.ones(2)}, p)
    >>> torch_load(p)["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

from kiln.errors import CorruptFileError, UnsafeFileError, UsageError

#: Environment variable that overrides the unpacked-size limit (bytes) for every archive.
MAX_UNPACKED_ENV = "KILN_MAX_UNPACKED_BYTES"
#: A compressed archive may unpack to this many times its size, plus ``_SLACK`` bytes.
_RATIO = 4
_SLACK = 64 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"

# What torch.load raises on a damaged file; none of these can mean a bug in Kiln's call.
_DAMAGED = (
    RuntimeError,
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    struct.error,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    OSError,
)


def unpacked_limit(file_size: int, limit: int | None = None) -> int:
    """The most bytes an archive of ``file_size`` bytes may unpack to.

    ``limit`` wins when given; otherwise ``$KILN_MAX_UNPACKED_BYTES``; otherwise
    ``4 * file_size + 64 MiB``, far above what a genuine ``torch.save`` file needs.

    Example:
        >>> unpacked_limit(10, limit=100)
        100
    """
    if limit is not None:
        return limit
    env = os.environ.get(MAX_UNPACKED_ENV, "").strip()
    if env:
        try:
            value = int(float(env))
        except ValueError:
            value = -1
        if value <= 0:
            raise UsageError(f"{MAX_UNPACKED_ENV}={env[:40]!r} is not a positive number of bytes")
        return value
    return _RATIO * file_size + _SLACK


def is_zip(path: str | Path) -> bool:
    """True when ``path`` starts like a zip archive (as every ``torch.save`` file since 1.6)."""
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def check_archive(path: str | Path, *, limit: int | None = None) -> None:
    """Refuse a zip archive that is truncated or that would unpack past the limit.

    Only the central directory is read. A file that is not a zip archive passes (torch's older
    format is checked by ``torch.load`` itself).

    Raises:
        CorruptFileError: the archive is truncated or its directory is damaged.
        UnsafeFileError: the members declare more bytes than :func:`unpacked_limit` allows.

    Example:
        >>> import tempfile, torch
        >>> p = tempfile.mktemp(suffix=".pt"); torch.save(torch.zeros(4), p)
        >>> check_archive(p)
    """
    p = Path(path)
    if not is_zip(p):
        return
    with open(p, "rb") as f:
        check_zip(f, p.stat().st_size, str(p), limit=limit)


def check_zip(file: IO[bytes], size: int, label: str, *, limit: int | None = None) -> None:
    """:func:`check_archive` on an open zip archive of ``size`` bytes (``label`` names it)."""
    try:
        with zipfile.ZipFile(file) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise CorruptFileError(
            f"{label} is corrupt or truncated: its zip directory cannot be read ({_first(exc)}); "
            "use an intact copy of the file"
        ) from None
    total = 0
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise CorruptFileError(
                f"{label} is corrupt or truncated: member {info.filename[:80]!r} ends past the "
                "end of the file; use an intact copy of the file"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CorruptFileError(
                f"{label} is corrupt: stored member {info.filename[:80]!r} declares "
                f"{info.file_size} bytes but holds {info.compress_size}; use an intact copy"
            )
        total += info.file_size
    cap = unpacked_limit(size, limit)
    if total > cap:
        raise UnsafeFileError(
            f"refused to load {label}: its {size}-byte archive declares {total} unpacked bytes "
            f"(limit {cap}), a decompression bomb; if the file is genuine, raise the limit "
            f"with {MAX_UNPACKED_ENV}=<bytes>"
        )


def torch_load(path: str | Path, *, map_location: Any = "cpu", limit: int | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` after :func:`check_archive`, with one-line errors.

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the pickle would import something (the message names it), or the
            archive is a decompression bomb.
        CorruptFileError: anything else that stops torch from reading it.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(2, "No such file", str(p))
    check_archive(p, limit=limit)
    try:
        with warnings.catch_warnings():
            # A plain pickle (protocol != 2) warns before it is refused below: say it once.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        name = found.group(1)[:120] if found else _plain_pickle_global(p)
        if name:
            raise UnsafeFileError(
                f"refused to load {p}: it would import {name} when unpickled, which would run "
                "code, so it is not a plain weights file. Kiln loads with weights_only=True and "
                "never executes such files; save plain tensors (model.state_dict()) instead"
            ) from None
        raise CorruptFileError(f"{p} is corrupt or truncated ({_detail(exc)})") from None
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise
    except _DAMAGED as exc:
        raise CorruptFileError(
            f"{p} is corrupt or truncated ({type(exc).__name__}: {_first(exc)})"
        ) from None


def _plain_pickle_global(path: Path) -> str | None:
    """The first import in ``path`` when it is a complete plain pickle (read, never run).

    torch's ``weights_only`` reader stops at protocol 4/5 framing ("Unsupported operand") before
    it reaches the import, so a hostile plain pickle would otherwise be called merely corrupt.
    """
    import pickletools

    if path.stat().st_size > _SLACK:
        return None
    strings: list[str] = []
    first: str | None = None
    try:
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            if isinstance(arg, str):
                strings.append(arg)
            if first is None and op.name in ("GLOBAL", "INST"):
                first = str(arg).replace(" ", ".")
            elif first is None and op.name == "STACK_GLOBAL":
                first = ".".join(strings[-2:]) if len(strings) >= 2 else "a global"
            elif first is None and op.name in ("REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX"):
                first = "a callable"
    except Exception:  # not a complete pickle: damaged, not hostile
        return None
    return first


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def _detail(exc: BaseException) -> str:
    """The useful line of torch's long ``weights_only`` message (after 'WeightsUnpickler')."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error") and i + 1 < len(lines):
            return lines[i + 1][:160]
    return lines[-2][:160] if len(lines) >= 2 else _first(exc)

"""Inspect an exported ``.pt2`` archive before ``torch.export.load`` reads it.

``torch.export.load`` is not safe on a file from someone else (its own docstring says so):

* a weight or constant whose payload config says ``use_pickle`` is read with
  ``torch.load(..., weights_only=False)``, i.e. unpickled, which can run any code;
* constants named ``custom_obj_*`` / ``opaque_obj_*`` are unpickled too;
* the sample inputs and legacy ``.pt`` payloads are tried with ``weights_only=True`` and, when
  that fails, silently retried with ``weights_only=False``;
* ``data/aotinductor/`` holds compiled native code that is loaded as a shared library;
* an archive without ``archive_version`` is read by an older path with the same fallback.

:func:`check_pt2` reads the archive's records with torch's own zip reader (the one
``torch.export.load`` uses, so both see the same entries) and refuses all of the above unless the
user opts in. Every ``.pt2`` Kiln loads goes through it. Files ``kiln export`` writes hold none
of these and pass.

Example:
    >>> check_pt2("out/model.pt2", trust_code=False)   # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from kiln.errors import CorruptFileError, UnsafeFileError
from kiln.trust.targets import TRUST_OPTION

__all__ = ["check_pt2"]

_WEIGHTS, _CONSTANTS = "data/weights/", "data/constants/"
_NATIVE = ("data/aotinductor/", "data/mtia")
_PICKLED_CONSTANTS = ("custom_obj_", "opaque_obj_")


def check_pt2(path: str | Path, *, trust_code: bool = False) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle or run code, before it is loaded.

    Args:
        path: the ``.pt2`` file.
        trust_code: the user's opt-in; nothing is checked then.

    Raises:
        UnsafeFileError: an entry would be unpickled with ``weights_only=False`` or is native
            code; the message names the entry and the opt-in.
        CorruptFileError: the file is not a readable torch.export archive.
    """
    if trust_code:
        return
    import torch

    p = Path(path)
    try:
        reader = torch._C.PyTorchFileReader(str(p))  # the reader torch.export.load uses
        names = set(reader.get_all_records())
    except RuntimeError as exc:
        raise CorruptFileError(
            f"{p} is not a readable .pt2 archive ({str(exc).splitlines()[0][:120]}); export it "
            "again with `kiln export RUN --format exported`"
        ) from exc
    if "archive_version" not in names:
        _refuse(p, "it has no archive_version: torch would read it by its older, pickle-based path")
    for name in sorted(names):
        if name.startswith(_NATIVE):
            _refuse(p, f"{name} is compiled native code that loading would run")
    for name in sorted(names):
        if name.endswith(("_weights_config.json", "_constants_config.json")) and name.startswith(
            (_WEIGHTS, _CONSTANTS)
        ):
            _check_payload_config(p, name, reader.get_record(name))
        elif name.endswith(".pt"):
            _check_weights_only(p, name, reader.get_record(name))


def _check_payload_config(p: Path, name: str, raw: bytes) -> None:
    """Refuse entries of a weights/constants config that torch would unpickle."""
    try:
        config = json.loads(raw)["config"]
        entries = [(str(k), dict(v)) for k, v in config.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{p}: {name} is not a payload config ({exc})") from exc
    for fqn, meta in entries:
        file = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or file.startswith(_PICKLED_CONSTANTS):
            _refuse(p, f"{fqn!r} ({file}) is stored as a pickle that loading would unpickle")


def _check_weights_only(p: Path, name: str, raw: bytes) -> None:
    """Refuse a ``.pt`` payload that only loads with ``weights_only=False``.

    torch reads these with ``weights_only=True`` first and falls back to unpickling on failure;
    loading it here the safe way tells whether the fallback would be taken.
    """
    import torch

    try:
        torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # any failure means torch would retry with weights_only=False
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        _refuse(p, f"{name} does not load with weights_only=True ({detail})")


def _refuse(p: Path, why: str) -> None:
    raise UnsafeFileError(
        f"{p} is unsafe to load: {why}; refused before loading. If you trust where this file "
        f"comes from, pass {TRUST_OPTION}"
    )

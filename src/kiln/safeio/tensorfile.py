"""Check a ``.safetensors`` file's header, and its tensors against a model, before loading it.

The safetensors library refuses damaged files, but with messages (``HeaderTooLarge``,
``InvalidOffset``, a Rust panic text) that do not name the file, and it loads a file whose header
was edited from ``F32`` to ``I32`` (same size) without a word: the bytes are then reinterpreted
and copied into float weights. :func:`read_header` parses the header itself (8-byte length, JSON,
known dtypes, shapes whose byte size matches their offsets, offsets that tile the data) and
:func:`check_against_model` compares every tensor's dtype and shape with the model that will
receive it.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> p = tempfile.mktemp(suffix=".safetensors")
    >>> save_file({"w": torch.ones(2, 3)}, p)
    >>> read_header(p)[0]["w"]
    TensorEntry(dtype='F32', shape=(2, 3))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import CorruptFileError

#: Bytes per element of every dtype the safetensors library can load into torch.
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "C64": 8,
    "U64": 8,
    "U32": 4,
    "U16": 2,
}
#: The safetensors library's own cap on the header.
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it."""

    dtype: str
    shape: tuple[int, ...]

    def torch_dtype(self) -> Any:
        from safetensors.torch import _getdtype

        return _getdtype(self.dtype)


def _corrupt(path: Path, why: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path} is corrupt: {why}; it is not a valid .safetensors file (use an intact copy, or "
        "write it again with safetensors.torch.save_file)"
    )


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and the ``__metadata__`` of a ``.safetensors`` file, validated.

    Raises:
        CorruptFileError: empty or truncated file, bad header length, header not a JSON object,
            unknown dtype, a shape that does not match its byte range, offsets out of range or
            overlapping, metadata that is not text.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(p, f"it is {size} bytes long, too short for a header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n > size - 8:
            raise _corrupt(p, f"its header length ({n} bytes) exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(p, f"its header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise _corrupt(p, "its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _corrupt(p, "its __metadata__ is not a map of text to text")
    data_size = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        entries[name] = _entry(p, name, info, data_size, spans)
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise _corrupt(p, f"tensor {name[:80]!r} starts at byte {begin}, expected {end}")
        end = stop
    if end != data_size:
        raise _corrupt(p, f"its tensors cover {end} of {data_size} data bytes (truncated?)")
    return entries, meta


def _entry(
    p: Path, name: str, info: Any, data_size: int, spans: list[tuple[int, int, str]]
) -> TensorEntry:
    label = f"tensor {name[:80]!r}"
    if not isinstance(info, dict):
        raise _corrupt(p, f"{label} is not described by an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise _corrupt(
            p, f"{label} has unknown dtype {str(dtype)[:20]!r} (known: {', '.join(_ITEMSIZE)})"
        )
    if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape) or len(shape) > 64:
        raise _corrupt(p, f"{label} has an invalid shape {str(shape)[:60]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_nonneg_int, offsets)):
        raise _corrupt(p, f"{label} has invalid data_offsets {str(offsets)[:60]}")
    begin, stop = offsets
    if not begin <= stop <= data_size:
        raise _corrupt(
            p, f"{label} spans bytes {begin}..{stop}, outside the {data_size} data bytes"
        )
    need = math.prod(shape) * _ITEMSIZE[dtype]
    if need != stop - begin:
        raise _corrupt(
            p, f"{label} of shape {tuple(shape)} needs {need} bytes but spans {stop - begin}"
        )
    spans.append((begin, stop, name))
    return TensorEntry(dtype, tuple(shape))


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def dtype_kind(dtype: Any) -> str:
    """``float``, ``complex``, ``bool`` or ``integer``: a cast within a kind only changes precision.

    Example:
        >>> import torch
        >>> dtype_kind(torch.bfloat16), dtype_kind(torch.int32)
        ('float', 'integer')
    """
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if str(dtype) == "torch.bool" else "integer"


def check_against_model(
    path: str | Path,
    entries: Mapping[str, TensorEntry],
    target: Mapping[str, Any],
    *,
    exact: bool = True,
) -> None:
    """Refuse a file whose tensors differ in dtype or shape from the model's (same names).

    Args:
        path: the file (for the message).
        entries: its header, from :func:`read_header`.
        target: the model's ``state_dict()``.
        exact: dtypes must be equal (a run's own weights); otherwise only of the same kind
            (float, integer, bool, complex), as when pretrained weights are cast on load.

    Raises:
        CorruptFileError: the differences, up to four, and what to do.

    Example:
        >>> import torch
        >>> check_against_model("w.safetensors", {"w": TensorEntry("F32", (2,))},
        ...                     {"w": torch.zeros(2)})
    """
    bad = []
    for name, entry in entries.items():
        if name not in target or not hasattr(target[name], "dtype"):
            continue
        want = target[name]
        got = entry.torch_dtype()
        same = got == want.dtype if exact else dtype_kind(got) == dtype_kind(want.dtype)
        if not same:
            bad.append(f"{name} is {entry.dtype} in the file, {want.dtype} in the model")
        elif tuple(want.shape) != entry.shape:
            bad.append(
                f"{name} has shape {entry.shape} in the file, {tuple(want.shape)} in the model"
            )
    if bad:
        more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
        raise CorruptFileError(
            f"{path} does not match the model: {'; '.join(bad[:4])}{more}; the file is damaged "
            "or was written for another model: use the run's own weights file"
        )


def load_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors of a checked ``.safetensors`` file (CPU) and its metadata.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> p = tempfile.mktemp(suffix=".safetensors"); save_file({"b": torch.zeros(1)}, p)
        >>> sorted(load_file(p)[0])
        ['b']
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file as st_load_file

    _, meta = read_header(path)
    try:
        return st_load_file(str(path)), meta
    except SafetensorError as exc:  # what the header check above cannot see
        raise _corrupt(Path(path), str(exc).splitlines()[0][:120] if str(exc) else "") from None


def load_into(
    model: Any, path: str | Path, entries: Mapping[str, TensorEntry], *, device: Any = "cpu"
) -> None:
    """Check ``path``'s tensors against ``model`` (exact dtypes and shapes), then load them.

    Raises:
        CorruptFileError: a tensor's dtype or shape differs from the model's.
        kiln.errors.ModelError: the file and the model have different tensor names.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_model
        >>> net, p = torch.nn.Linear(2, 1), tempfile.mktemp(suffix=".safetensors")
        >>> save_model(net, p)
        >>> load_into(net, p, read_header(p)[0])
    """
    from safetensors.torch import load_model

    from kiln.errors import ModelError

    check_against_model(path, entries, model.state_dict())
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as exc:
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"{path} does not fit {type(model).__name__} ({detail}); load the run's own weights "
            "file, or pass the model it was trained with"
        ) from None

"""Read a ``torch.distributed.checkpoint`` (DCP) folder without unpickling anything unknown.

DCP keeps a folder's index in ``.metadata``, written with ``pickle.dump`` and read back by
``FileSystemReader.read_metadata`` with a plain ``pickle.load``: a forged ``.metadata`` runs any
code it likes the moment a sharded checkpoint is resumed, evaluated or consolidated. Here the file
is read by :class:`MetadataUnpickler`, which admits only the classes DCP's own metadata is made of
(found by recording every global a real checkpoint's ``.metadata`` needs), and the index is then
checked: every shard file it names is a plain file name inside the folder and every byte range
lies inside that file. :class:`SafeFileSystemReader` is the reader Kiln hands ``dcp.load``: it
reads the metadata the same way, so DCP itself never runs ``pickle.load`` on the file, and it
checks each tensor record's archive sizes before ``torch.load`` sees it.

Example:
    >>> import io, pickle, torch
    >>> MetadataUnpickler(io.BytesIO(pickle.dumps(torch.Size([2, 3]))), "x").load()
    torch.Size([2, 3])
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import IO, Any

from kiln.errors import CorruptFileError, UnsafeFileError

METADATA = ".metadata"
_META = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
#: Every global a DCP ``.metadata`` pickle may name (torch dtypes are admitted by type).
ALLOWED_GLOBALS = frozenset(
    {
        (_META, "Metadata"),
        (_META, "TensorStorageMetadata"),
        (_META, "ChunkStorageMetadata"),
        (_META, "BytesStorageMetadata"),
        (_META, "TensorProperties"),
        (_META, "MetadataIndex"),
        (_META, "StorageMeta"),
        (_META, "_MEM_FORMAT_ENCODING"),
        (_FS, "_StorageInfo"),
        (_FS, "_StoragePrefix"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)
# What a damaged pickle makes the unpickler (or an admitted constructor) raise.
_DAMAGED = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    ImportError,
    RecursionError,
    MemoryError,
)
#: Largest ``.metadata`` read (a real one is a few hundred bytes per tensor).
MAX_METADATA_BYTES = 256 * 2**20


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and torch dtypes.

    Args:
        file: the open ``.metadata`` file.
        origin: its path, for messages.
    """

    def __init__(self, file: IO[bytes], origin: str | Path) -> None:
        super().__init__(file)
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in ALLOWED_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise UnsafeFileError(
            f"refused to read {self.origin}: this sharded-checkpoint metadata would load "
            f"{module[:60]}.{name[:60]}, which is not part of a torch.distributed.checkpoint "
            "index and could run code; nothing was loaded. Only use checkpoints you wrote"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptFileError(f"{self.origin} is corrupt: unexpected persistent id in metadata")


def read_metadata(directory: str | Path, name: str = METADATA) -> Any:
    """The checked DCP ``Metadata`` of ``directory`` (its ``.metadata`` file, or ``name``).

    Raises:
        UnsafeFileError: the pickle names a global outside :data:`ALLOWED_GLOBALS`.
        CorruptFileError: missing, damaged, or an index that points outside the folder.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    d = Path(directory)
    path = label = d / name
    if not path.is_file():
        raise CorruptFileError(
            f"sharded checkpoint {d} is incomplete: {name} is missing (the write was "
            "interrupted?); resume from an earlier checkpoint"
        )
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise CorruptFileError(f"{label} is corrupt: over {MAX_METADATA_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            meta = MetadataUnpickler(f, label).load()
    except (UnsafeFileError, CorruptFileError):
        raise
    except _DAMAGED as exc:
        raise CorruptFileError(
            f"{label} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
            "resume from an earlier checkpoint"
        ) from None
    if not isinstance(meta, Metadata):
        raise CorruptFileError(f"{label} is corrupt: it holds a {type(meta).__name__}")
    check_index(d, meta, label)
    return meta


def check_index(directory: Path, meta: Any, label: str | Path) -> None:
    """Every shard record names a plain file in ``directory`` and a byte range inside it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    storage = meta.storage_data
    if not isinstance(storage, dict) or not isinstance(meta.state_dict_metadata, dict):
        raise CorruptFileError(f"{label} is corrupt: its index is not a mapping")
    sizes: dict[str, int] = {}
    for info in storage.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CorruptFileError(f"{label} is corrupt: a storage record is malformed")
        name = info.relative_path
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise UnsafeFileError(
                f"refused to read {label}: it names the shard file {name[:80]!r}, which is not "
                "a file inside the checkpoint folder"
            )
        if name not in sizes:
            shard = directory / name
            if not shard.is_file():
                raise CorruptFileError(
                    f"sharded checkpoint {directory} is incomplete: {name[:80]} is missing"
                )
            sizes[name] = shard.stat().st_size
        offset, length = info.offset, info.length
        ints = isinstance(offset, int) and isinstance(length, int)
        if not (ints and offset >= 0 and length >= 0 and offset + length <= sizes[name]):
            raise CorruptFileError(
                f"{label} is corrupt: a record spans bytes past the end of {name[:80]}"
            )


def _safe_reader_class() -> type:
    """:class:`SafeFileSystemReader`, built on first use (DCP imports are slow)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    from kiln.safeio.torchfile import check_zip

    class SafeFileSystemReader(FileSystemReader):
        """``FileSystemReader`` whose metadata goes through :func:`read_metadata`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")  # DCP falls back to a rank's own __<rank>.metadata
            name = METADATA if rank is None else f"__{int(rank)}{METADATA}"
            meta = read_metadata(Path(self.path), name)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

        def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
            # Each record is a torch.save archive that torch.load allocates by declared size.
            view = super()._slice_file(file, sinfo)
            data = view.read(sinfo.length)
            check_zip(io.BytesIO(data), len(data), f"{self.path}/{sinfo.relative_path}")
            return io.BytesIO(data)

    return SafeFileSystemReader


def safe_reader(directory: str | Path) -> Any:
    """A DCP storage reader for ``directory`` that never unpickles unchecked metadata.

    Example:
        >>> import torch.distributed.checkpoint as dcp                     # doctest: +SKIP
        >>> dcp.load(state, storage_reader=safe_reader("step-10.dcp"))    # doctest: +SKIP
    """
    return _safe_reader_class()(str(directory))

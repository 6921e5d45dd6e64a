"""Checkpoints: one home for what a checkpoint holds, how it is written, found and read.

* :mod:`~kiln.train.checkpoint.schema`: what a checkpoint dict holds (its keys, the format
  version, the errors for missing, corrupt, unsafe or too-new files).
* :mod:`~kiln.train.checkpoint.files`: atomic writes (temp file, fsync, rename), orphan clean-up,
  and loading with ``weights_only=True`` behind Kiln's checks.
* :mod:`~kiln.train.checkpoint.manager`: a run's ``checkpoints/`` folder (keep-last/keep-best,
  ``last``/``best`` pointers, ``index.json``) and :func:`resolve_checkpoint`.
* :mod:`~kiln.train.checkpoint.state`: model and optimizer state, full or sharded (FSDP2/DCP),
  the same way for any world size.
* :mod:`~kiln.train.checkpoint.weights`: ``model.safetensors`` (weights without pickle) and
  rebuilding a model from it or from a checkpoint.

What the Trainer puts into a checkpoint (capturing and restoring the loop) is
:mod:`kiln.train.snapshots`. The names below are the public API; import them from here.

Example:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> ckpts = CheckpointManager(d, keep_last=2)
    >>> p = ckpts.save({"model": {"w": torch.ones(2)}}, step=10)
    >>> load_checkpoint(resolve_checkpoint(d))["model"]["w"].tolist()
    [1.0, 1.0]
"""

from kiln.train.checkpoint.files import (
    atomic_write,
    load_checkpoint,
    remove_orphans,
    save_checkpoint,
)
from kiln.train.checkpoint.manager import CKPT_SUFFIX, CheckpointManager, resolve_checkpoint
from kiln.train.checkpoint.schema import (
    FORMAT_VERSION,
    RESUME_KEYS,
    WEIGHT_KEYS,
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

__all__ = [
    "CKPT_SUFFIX",
    "FORMAT_VERSION",
    "RESUME_KEYS",
    "WEIGHT_KEYS",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "atomic_write",
    "load_checkpoint",
    "remove_orphans",
    "resolve_checkpoint",
    "save_checkpoint",
]

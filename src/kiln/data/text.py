"""Character-level language-model data from a local UTF-8 text file (``data.name=text``).

Each example is a window of ``block_size`` character ids ``x = ids[i : i + B]`` with the next
characters ``y = ids[i + 1 : i + B + 1]`` as targets (nanoGPT's shakespeare_char setup). The
vocabulary is the sorted set of characters in the file, kept in ``info.extra["vocab"]`` so a run
directory can decode generated ids without the corpus.

Why the splits are contiguous (train = the first part of the text, then val, then test) instead
of shuffled windows: windows overlap, so a shuffled split would put most of every validation
window's characters in the training set too. Each part is windowed separately, so no window
crosses a split boundary.

Example:
    >>> ids = encode("hello", vocab="ehlo")
    >>> ids.tolist(), decode(ids, vocab="ehlo")
    ([1, 0, 2, 2, 3], 'hello')
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.config import DataConfig
from kiln.data.base import ArrayDataset, DataBundle, DataInfo
from kiln.data.files import read_utf8
from kiln.data.splits import split_sizes
from kiln.errors import DataError

__all__ = ["build_text", "decode", "encode", "windows"]


def encode(text: str, vocab: str) -> torch.Tensor:
    """Character ids (int64) of ``text`` under ``vocab`` (id = position in ``vocab``).

    Raises:
        DataError: ``text`` has a character that is not in ``vocab``.
    """
    index = {ch: i for i, ch in enumerate(vocab)}
    try:
        return torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    except KeyError as exc:
        raise DataError(
            f"character {exc.args[0]!r} is not in the vocabulary of {len(vocab)} characters; "
            "use only characters that occur in the training corpus"
        ) from None


def decode(ids: torch.Tensor | list[int], vocab: str) -> str:
    """The text of character ids ``ids`` under ``vocab`` (inverse of :func:`encode`)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return "".join(vocab[i] for i in values)


def windows(ids: torch.Tensor, block_size: int, stride: int) -> ArrayDataset:
    """Input/target windows over a 1-D id tensor: ``x[k] = ids[s:s+B]``, ``y[k] = ids[s+1:s+B+1]``.

    With ``s = k * stride``. The windows are strided views of ``ids`` (no copy), so a small
    stride does not multiply memory; a batch gather copies only the batch.

    Example:
        >>> ds = windows(torch.arange(6), block_size=3, stride=2)
        >>> ds.x.tolist(), ds.y.tolist()
        ([[0, 1, 2], [2, 3, 4]], [[1, 2, 3], [3, 4, 5]])
    """
    if len(ids) < block_size + 1:
        raise DataError(f"{len(ids)} ids are too few for one window of {block_size} + 1")
    return ArrayDataset(
        ids[:-1].unfold(0, block_size, stride), ids[1:].unfold(0, block_size, stride)
    )


def build_text(cfg: DataConfig, *, seed: int) -> DataBundle:
    """Read ``cfg.path`` as UTF-8 and cut it into contiguous train/val/test windows.

    Args:
        cfg: uses ``path``, ``text.block_size``, ``text.stride`` (default: ``block_size``, so
            windows do not overlap), ``val_fraction`` and ``test_fraction``.
        seed: unused (the split is contiguous, not random); kept for one signature per source.

    Returns:
        One :class:`ArrayDataset` per split with int64 ``(B,)`` inputs and targets; ``info.task``
        is ``lm``, ``info.vocab_size`` the number of distinct characters.

    Raises:
        DataError: missing or non-UTF-8 file, a ``task`` other than ``auto``, or a text too
            short to give every split at least one window.
    """
    del seed
    if cfg.task != "auto":
        raise DataError(
            f"text data is next-character prediction; set data.task=auto, not {cfg.task}"
        )
    path = Path(cfg.path or "")
    text = read_utf8(path, "text file")
    block = cfg.text.block_size
    stride = cfg.text.stride or block
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab)

    sizes = split_sizes(
        len(ids),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        what=f"characters in {path.name}",
    )
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        if 0 < n < block + 1 or (split == "train" and n < block + 1):
            raise DataError(
                f"{path.name} has {len(ids)} characters; its {split} split gets {n}, fewer than "
                f"one window needs (block_size + 1 = {block + 1}); use a longer text, a smaller "
                "data.text.block_size, or lower that split's fraction (0 turns it off)"
            )
    n_train, n_val, _ = sizes
    parts = ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]
    train, val, test = (windows(p, block, stride) if len(p) else None for p in parts)
    assert train is not None
    info = DataInfo(
        task="lm",
        input_shape=(block,),
        vocab_size=len(vocab),
        extra={
            "source": "text",
            "path": str(path),
            "vocab": vocab,
            "block_size": block,
            "stride": stride,
            "characters": {"train": n_train, "val": n_val, "test": len(parts[2])},
            "splits": {
                "train": len(train),
                "val": len(val) if val is not None else 0,
                "test": len(test) if test is not None else 0,
            },
        },
    )
    return DataBundle(train=train, val=val, test=test, info=info)

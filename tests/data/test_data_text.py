"""Character-level text: windows shifted by one, vocabulary roundtrip, contiguous splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.config import DataConfig, TextConfig
from kiln.data import build_data, decode, encode, is_batched
from kiln.data.text import windows

CORPUS = "the quick brown fox jumps over the lazy dog. " * 8  # 360 characters


def _cfg(path: Path, block: int = 8, stride: int | None = None, **kw: object) -> DataConfig:
    text = TextConfig(block_size=block, stride=stride)
    return DataConfig(name="text", path=str(path), text=text, **kw)  # type: ignore[arg-type]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def test_vocab_and_roundtrip(corpus: Path) -> None:
    info = build_data(_cfg(corpus), seed=0).info
    vocab = info.extra["vocab"]
    assert vocab == "".join(sorted(set(CORPUS)))
    assert info.vocab_size == len(vocab) == 28
    assert info.task == "lm" and info.input_shape == (8,) and info.num_classes is None
    assert decode(encode(CORPUS, vocab), vocab) == CORPUS
    json.dumps(info.extra)
    with pytest.raises(ValueError, match="'Z' is not in the vocabulary"):
        encode("Z", vocab)


def test_windows_are_shifted_by_one(corpus: Path) -> None:
    bundle = build_data(_cfg(corpus), seed=0)
    assert is_batched(bundle.train)
    x, y = bundle.train.__getitems__([0, 1, 2])  # type: ignore[attr-defined]
    assert x.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    vocab = bundle.info.extra["vocab"]
    assert decode(x[1], vocab) == CORPUS[8:16]  # default stride = block_size
    assert decode(y[1], vocab) == CORPUS[9:17]


def test_splits_are_contiguous_parts(corpus: Path) -> None:
    bundle = build_data(_cfg(corpus, val_fraction=0.1, test_fraction=0.2), seed=0)
    chars = bundle.info.extra["characters"]
    assert chars == {"train": 252, "val": 36, "test": 72}
    vocab = bundle.info.extra["vocab"]
    assert bundle.val is not None and bundle.test is not None
    assert decode(bundle.val[0][0], vocab) == CORPUS[252:260]
    assert decode(bundle.test[0][0], vocab) == CORPUS[288:296]
    # No window crosses a boundary: the last train target ends inside the train part.
    last_y = bundle.train[len(bundle.train) - 1][1]
    start = (len(bundle.train) - 1) * 8 + 1
    assert start + 8 <= 252 and decode(last_y, vocab) == CORPUS[start : start + 8]
    assert len(bundle.train) == (252 - 1 - 8) // 8 + 1


def test_stride_and_window_count() -> None:
    ds = windows(torch.arange(10), block_size=4, stride=1)
    assert len(ds) == 6
    assert ds.x[5].tolist() == [5, 6, 7, 8] and ds.y[5].tolist() == [6, 7, 8, 9]


def test_zero_fraction_turns_a_split_off(corpus: Path) -> None:
    bundle = build_data(_cfg(corpus, val_fraction=0.0, test_fraction=0.0), seed=0)
    assert bundle.val is None and bundle.test is None
    assert len(bundle.train) == (360 - 1 - 8) // 8 + 1


def test_too_short_for_a_window_per_split(corpus: Path) -> None:
    with pytest.raises(ValueError, match=r"its val split gets 36, fewer than one window needs"):
        build_data(_cfg(corpus, block=64), seed=0)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text file not found"):
        build_data(_cfg(tmp_path / "missing.txt"), seed=0)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(
        ValueError,
        match=r"latin1\.txt is not UTF-8 text: byte 3 \(line 1\) is 0xe9 .* re-save it as UTF-8",
    ):
        build_data(_cfg(bad), seed=0)

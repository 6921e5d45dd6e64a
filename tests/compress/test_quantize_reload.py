"""Every quantization method's saved file is reloaded and checked; fallbacks say what happened.

The models are tiny and untrained: these tests are about the files and the words, not accuracy.
Inductor is kept out (``torch.compile`` is replaced by a stub) so they run in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kiln.compress.quantize.pt2e as pt2e_module
from kiln.compress.quantize.core import quantize, reload_max_abs_diff
from kiln.compress.quantize.pt2e import _FrozenProgram

# The error Inductor raises for the int8 convolution lowering with a symbolic batch (torch 2.13).
INDUCTOR_ASSERT = (
    "expected size 16==16, stride 1==1024 at dim=1; expected size 32==32, stride 512==32 at dim=2"
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.zeros(16, dtype=torch.long))] * 4


def _compile_stub(fail_dynamic: bool) -> Callable[..., Any]:
    """``torch.compile`` without Inductor; the dynamic graph fails the way Inductor's does."""

    def compile(program: nn.Module, *, dynamic: bool) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            if dynamic and fail_dynamic:
                raise AssertionError(INDUCTOR_ASSERT)
            return program(x)

        return run

    return compile


@pytest.fixture
def no_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pt2e_module.torch, "compile", _compile_stub(fail_dynamic=False))


def test_static_compile_fallback_says_what_failed_and_what_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pt2e_module.torch, "compile", _compile_stub(fail_dynamic=True))
    frozen = _FrozenProgram(_net(), torch.randn(8, 8))
    assert frozen.dynamic is False and frozen.fallback is not None
    text = frozen.fallback
    assert text.startswith("Inductor could not compile the int8 program for a dynamic batch size")
    assert f"AssertionError: {INDUCTOR_ASSERT}"[:60] in text  # the cause, quoted, cut short
    assert "one static graph is compiled per batch size instead: batch 1 and 8 now" in text
    assert "uncompiled Q/DQ program runs (same outputs, slower)" in text


def test_pt2e_notes_carry_the_fallback_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pt2e_module.torch, "compile", _compile_stub(fail_dynamic=True))
    q = quantize(_net(), "pt2e", calib_loader=_batches(), example=torch.randn(8, 8))
    assert q.notes["compiled"] == "static, one graph per batch size"
    assert len(q.notes["messages"]) == 1 and "Inductor could not compile" in q.notes["messages"][0]
    assert not any(str(v).startswith("AssertionError") for v in q.notes.values())


def test_pt2e_export_fallback_says_the_batch_is_fixed(no_inductor: None) -> None:
    class FixedBatch(nn.Module):  # a reshape that pins the batch size
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).reshape(8, 4)

    calib = [torch.randn(8, 8) for _ in range(3)]  # batches of 8: all this model takes
    q = quantize(FixedBatch().eval(), "pt2e", calib_loader=calib, example=torch.randn(8, 8))
    assert q.notes["dynamic_batch"] is False
    (message,) = q.notes["messages"]
    assert message.startswith("torch.export could not capture the model with a dynamic batch")
    assert "fixed batch of 8 instead, so the int8 program takes batches of 8 only" in message


@pytest.mark.parametrize("method", ["dynamic", "static", "pt2e", "onnx-int8"])
def test_every_methods_file_is_reloaded_to_the_same_outputs(
    method: str, tmp_path: Path, no_inductor: None
) -> None:
    x = torch.randn(5, 8)
    q = quantize(_net(), method, calib_loader=_batches(), example=torch.randn(8, 8))
    path = q.save(tmp_path)
    assert reload_max_abs_diff(q, path, x, model=_net()) == 0.0


@pytest.mark.parametrize("method", ["pt2e", "onnx-int8"])
def test_reload_check_sees_a_file_of_another_model(
    method: str, tmp_path: Path, no_inductor: None
) -> None:
    calib, example = _batches(), torch.randn(8, 8)
    q = quantize(_net(), method, calib_loader=calib, example=example)
    path = q.save(tmp_path / "mine")
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    quantize(other, method, calib_loader=calib, example=example).save(tmp_path / "other")
    path.write_bytes((tmp_path / "other" / path.name).read_bytes())
    assert reload_max_abs_diff(q, path, torch.randn(5, 8)) > 1e-3

"""CUDA-only paths: fp16 + GradScaler, bf16, compile, cudnn.benchmark, pinned non_blocking copies.

Skipped without a CUDA device (see tests/conftest.py); the same code paths run on CPU elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def test_fp16_scaler_trains_and_state_roundtrips(make_cfg) -> None:
    fp32 = Trainer(make_cfg("device=cuda", "train.epochs=3", "name=fp32"), verbose=False).fit()
    cfg = make_cfg("device=cuda", "precision=fp16", "train.epochs=3")
    trainer = Trainer(cfg, verbose=False)
    assert trainer.engine.precision.scaler is not None
    result = trainer.fit()
    # fp16 with loss scaling learns what fp32 learns (this tiny 3-epoch MLP reaches ~0.79).
    assert result.test["acc"] > 0.7
    assert abs(result.test["acc"] - fp32.test["acc"]) < 0.03
    state = load_checkpoint(resolve_checkpoint(result.run_dir))
    scale = state["engine"]["precision"]["scaler"]["scale"]
    resumed = Trainer(
        make_cfg("device=cuda", "precision=fp16", "train.epochs=3", f"resume={result.run_dir}"),
        verbose=False,
    )
    assert resumed.engine.precision.scaler.get_scale() == scale


def test_bf16_and_cudnn_benchmark(make_cfg) -> None:
    common = ("device=cuda", "model.name=resnet", "model.kwargs={}", "optim.lr=0.003")
    fp32 = Trainer(make_cfg(*common, "train.epochs=4", "name=fp32"), verbose=False).fit()
    trainer = Trainer(make_cfg(*common, "precision=bf16", "train.epochs=4"), verbose=False)
    assert torch.backends.cudnn.benchmark
    bf16 = trainer.fit().test["acc"]
    assert bf16 > 0.85  # 0.94-0.95 on CPU in fp32 and bf16
    assert abs(bf16 - fp32.test["acc"]) < 0.05


def test_compile_on_cuda_matches_eager(make_cfg) -> None:
    eager = Trainer(make_cfg("device=cuda", "train.max_steps=5", "name=e"), verbose=False)
    eager.fit()
    comp = Trainer(
        make_cfg("device=cuda", "train.max_steps=5", "compile=true", "name=c"), verbose=False
    )
    comp.fit()
    torch.testing.assert_close(
        comp.engine.model.state_dict(), eager.engine.model.state_dict(), rtol=1e-4, atol=1e-5
    )


def test_pinned_loader_non_blocking(make_cfg) -> None:
    trainer = Trainer(make_cfg("device=cuda"), verbose=False)
    assert trainer.train_loader.pin_memory
    x, y = trainer.engine.to_device(next(iter(trainer.train_loader)))
    assert x.is_cuda and y.is_cuda
    assert kiln.Engine(device="cuda")._non_blocking

"""Small training helpers shared by model tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def overfit_losses(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30
) -> list[float]:
    """Adam on one fixed batch; the losses per step (a model that can learn drives them down)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_digits_mlp(out_dir: str | Path, *overrides: str) -> Path:
    """Train ``configs/digits_mlp.yaml`` for one quiet epoch under ``out_dir``; its run folder."""
    from runners import ROOT

    from kiln.config import load_config
    from kiln.train.trainer import Trainer

    base = [f"out_dir={out_dir}", "train.epochs=1", "log.tensorboard=false", "log.progress=false"]
    cfg = load_config(ROOT / "configs/digits_mlp.yaml", [*base, *overrides])
    return Path(Trainer(cfg, verbose=False).fit().run_dir)


def plain_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Any], None]:
    """A textbook classification train step on an ``(x, y)`` batch, as a user writes it."""

    def step(batch: Any) -> None:
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step

"""Kiln's Engine in your own training loop: bf16 autocast, accumulation, clipping, scheduling.

Run: python examples/engine_loop.py
Every line of the step stays visible; the Engine only does what each call says.
"""

from __future__ import annotations

import torch
from torch import nn

import kiln
from kiln.config import DataConfig
from kiln.data.loader import make_loader, start_epoch


def main() -> None:
    kiln.seed_everything(0)
    data = kiln.build_data(DataConfig(name="digits"), seed=0, layout="flat")
    loader = make_loader(data.train, batch_size=32, shuffle=True, seed=0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    engine = kiln.Engine(device="auto", precision="bf16", accumulate=2, clip_norm=1.0)
    model, _ = engine.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    epochs = 5
    n = len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * ((n + 1) // 2)
    )
    for epoch in range(epochs):
        start_epoch(loader, epoch)  # the order is a function of (seed, epoch): resumable
        for i, batch in enumerate(loader):
            x, y = engine.to_device(batch)
            with engine.micro_step(i, n) as update:  # no_sync on non-update steps under DDP
                with engine.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                engine.backward(loss)  # divided by the accumulation group size
            if update:
                engine.optimizer_step(optimizer)  # unscale -> clip -> step -> zero_grad
                schedule.step()
        print(f"epoch {epoch + 1}: last loss {loss.item():.4f}")

    test = make_loader(data.test, batch_size=256, shuffle=False)
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in test:
            x, y = engine.to_device(batch)
            with engine.autocast():
                correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    print(f"test accuracy {correct / total:.3f} after {engine.updates} updates")


if __name__ == "__main__":
    main()

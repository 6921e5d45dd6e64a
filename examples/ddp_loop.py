"""Your own loop on N processes with the Engine: the same code runs alone or under torchrun.

    python examples/ddp_loop.py                                    # one process
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py  # DDP over 2 processes

The Engine joins torchrun's process group (gloo on CPU, nccl on CUDA) and wraps the model in
DistributedDataParallel; the loader shards each global batch over the ranks; non-update
micro-steps skip the gradient all-reduce (no_sync).
"""

from __future__ import annotations

import torch
from torch import nn

import kiln
from kiln.config import DataConfig
from kiln.data.loader import make_loader, start_epoch


def main() -> None:
    kiln.seed_everything(0)
    engine = kiln.Engine(device="cpu", strategy="ddp", accumulate=2)  # world of 1 without torchrun
    world = engine.world
    data = kiln.build_data(DataConfig(name="digits"), seed=0, layout="flat")
    global_batch = 64
    loader = make_loader(
        data.train,
        batch_size=global_batch // world.size,
        shuffle=True,
        seed=0,
        rank=world.rank,
        world=world.size,
    )
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model, _ = engine.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n = len(loader)
    for epoch in range(5):
        start_epoch(loader, epoch)
        for i, batch in enumerate(loader):
            x, y = engine.to_device(batch)
            with engine.micro_step(i, n) as update:
                with engine.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                engine.backward(loss)
            if update:
                engine.optimizer_step(optimizer)
        if world.is_zero:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} ({world.size} process(es))")
    engine.close()


if __name__ == "__main__":
    main()

"""Run under torchrun (2 ranks): DDP gradients through the Engine equal single-process gradients
on the concatenated batch, and no_sync skips the all-reduce on non-update micro-steps."""

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from kiln.train.engine import Engine


def main() -> None:
    engine = Engine(device="cpu", strategy="ddp", accumulate=2)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    ddp, _ = engine.setup(model)
    calls = [0]

    # DDP checks these annotations at runtime: they must not be strings (no __future__ import).
    def counting_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls[0] += 1
        return allreduce_hook(state, bucket)  # type: ignore[arg-type]

    ddp.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    per_rank, n_micro = 4, 4
    xs = [torch.randn(per_rank * world, 8, generator=g) for _ in range(n_micro)]
    ys = [torch.randint(0, 3, (per_rank * world,), generator=g) for _ in range(n_micro)]
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for i in range(n_micro):
        with engine.micro_step(i, n_micro) as update:
            loss = nn.functional.cross_entropy(ddp(xs[i][mine]), ys[i][mine])
            engine.backward(loss)
        if not update:
            continue
        # the reference: one process, the whole group's global batch at once
        ref_opt.zero_grad()
        x = torch.cat(xs[i - 1 : i + 1])
        y = torch.cat(ys[i - 1 : i + 1])
        nn.functional.cross_entropy(ref(x), y).backward()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        engine.optimizer_step(opt)
        ref_opt.step()
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=1e-5, atol=1e-7)
    assert calls[0] == 2, f"expected one all-reduce per update (2), got {calls[0]}"
    assert engine.updates == 2
    # A stream of unknown length: 3 micro-batches (the last one short) = one update and a
    # partial group that ran under no_sync; flush averages it over the ranks and applies it.
    sizes = [per_rank, per_rank, per_rank // 2]
    for i, size in enumerate(sizes):
        x, y = engine.to_device((xs[i][mine][:size], ys[i][mine][:size]))
        with engine.micro_step(i, None) as update:
            engine.backward(nn.functional.cross_entropy(ddp(x), y))
        if update:
            engine.optimizer_step(opt)
    assert engine.pending == 1 and engine.flush(opt) and engine.updates == 4
    for group in ((0, 1), (2,)):
        ref_opt.zero_grad()
        parts = [
            (xs[i][r * per_rank :][: sizes[i]], ys[i][r * per_rank :][: sizes[i]])
            for i in group
            for r in range(world)
        ]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=1e-5, atol=1e-6)
    # Drop the DDP wrapper (its reducer holds the group) before the group ends: destroying the
    # group under a live reducer made gloo abort at exit ("terminate called ...") now and then.
    del ddp
    engine.close()
    if rank == 0:
        print("DDP-GRADS-OK")


if __name__ == "__main__":
    main()

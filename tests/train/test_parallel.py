"""Strategy selection and wrapping rules that need no second process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.data.loader import EpochSampler
from kiln.train import distributed
from kiln.train.build import per_rank_batch
from kiln.train.engine import Engine
from kiln.train.parallel import fsdp_units


def test_auto_strategy_follows_the_launch() -> None:
    assert distributed.resolve_strategy("auto", distributed.World(0, 1, 0)) == "single"
    assert distributed.resolve_strategy("auto", distributed.World(1, 4, 1)) == "ddp"
    with pytest.raises(ValueError, match="strategy=single but 2 processes"):
        distributed.resolve_strategy("single", distributed.World(0, 2, 0))


def test_horovod_is_refused_with_the_torchrun_equivalent() -> None:
    with pytest.raises(ValueError, match=r"unmaintained.*torchrun --nproc-per-node N"):
        Engine(device="cpu", strategy="horovod")


def test_dp_on_cpu_warns_and_falls_back() -> None:
    engine = Engine(device="cpu", strategy="dp")
    with pytest.warns(UserWarning, match="falling back to single-process"):
        model, _ = engine.setup(nn.Linear(2, 2))
    assert isinstance(model, nn.Linear)


def test_sync_batchnorm_on_cpu_says_why(make_cfg) -> None:
    engine = Engine(device="cpu", strategy="ddp", sync_batchnorm=True)  # a world of one
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm is GPU-only"):
            engine.setup(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    finally:
        engine.close()


def test_ddp_in_one_process_trains_like_single(make_cfg) -> None:
    from kiln.train.trainer import Trainer

    a = Trainer(make_cfg("train.max_steps=6", "name=a"), verbose=False)
    a.fit()
    b = Trainer(make_cfg("train.max_steps=6", "strategy=ddp", "name=b"), verbose=False)
    b.fit()
    assert not torch.distributed.is_initialized()  # the group it created is gone
    torch.testing.assert_close(b.engine.model.state_dict(), a.engine.model.state_dict())


def test_global_batch_must_divide_over_ranks(make_cfg) -> None:
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        per_rank_batch(make_cfg("data.batch_size=64"), 3)
    assert per_rank_batch(make_cfg("data.batch_size=64"), 4) == 16


def test_sharded_sampler_rebuilds_the_global_batches() -> None:
    full = EpochSampler(23, shuffle=True, seed=1).order()
    for world in (2, 3):
        shards = [EpochSampler(23, shuffle=True, seed=1, rank=r, world=world) for r in range(world)]
        orders = [s.order() for s in shards]
        assert {len(o) for o in orders} == {-(-23 // world)}  # padded to equal length
        inter = torch.stack([o[: 23 // world] for o in orders], 1).reshape(-1)
        assert torch.equal(inter, full[: len(inter)])  # rank-interleaved == global order
        for s in shards:
            s.set_epoch(0, start=6)
        rest = torch.stack([s.order()[: 17 // world] for s in shards], 1).reshape(-1)
        assert torch.equal(rest, full[6 : 6 + len(rest)])  # resume offset is global


def test_fsdp_units_prefer_blocks() -> None:
    from kiln.models.gpt import GPT

    gpt = GPT(vocab_size=11, block_size=8, n_layer=2, n_embd=16, n_head=2)
    assert [type(m).__name__ for m in fsdp_units(gpt)] == ["TransformerBlock"] * 2
    mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    assert len(fsdp_units(mlp)) == 2

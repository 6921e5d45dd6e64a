"""Batched gather: every dataset that can gather a batch at once yields the per-sample batches.

The reference is a plain ``DataLoader`` over a dataset that only has ``__getitem__`` (one call
per sample, ``default_collate``), fed the same :class:`EpochSampler` order. The fast path must
give the same tensors in the same order, batch by batch, for every epoch and resume position.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kiln.api import _as_bundle, infer_info
from kiln.config import Config
from kiln.data.base import ArrayDataset
from kiln.data.gather import batch_gather, columns, is_batched, returns_batches
from kiln.data.loader import ArrayLoader, make_loader, start_epoch


class PerSample(Dataset[Any]):
    """Only ``__getitem__``: what a DataLoader must index sample by sample."""

    def __init__(self, data: Dataset[Any]) -> None:
        self.data = data
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        self.reads += 1
        return self.data[i]


class WithGetitems(PerSample):
    """A user dataset following torch's batched-fetch protocol (a list of samples)."""

    def __init__(self, data: Dataset[Any]) -> None:
        super().__init__(data)
        self.calls = 0

    def __getitems__(self, indices: list[int]) -> list[Any]:
        self.calls += 1
        return [self.data[i] for i in indices]


def _tensors(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.randperm(n, generator=g)  # unique targets


def _datasets() -> dict[str, Dataset[Any]]:
    x, y = _tensors()
    inner = list(range(3, 100))[::-1]  # a reversed Subset of a Subset: composition matters
    return {
        "tensor": TensorDataset(x, y),
        "tensor-subset": Subset(Subset(TensorDataset(x, y), inner), list(range(0, 97, 2))),
        "array": ArrayDataset(x, y),
        "array-subset": Subset(Subset(ArrayDataset(x, y), inner), list(range(0, 97, 2))),
        "getitems": WithGetitems(TensorDataset(x, y)),
        "getitems-subset": Subset(WithGetitems(TensorDataset(x, y)), inner),
    }


def _reference(ds: Dataset[Any], order: torch.Tensor, bs: int, drop_last: bool) -> list[Any]:
    loader = DataLoader(PerSample(ds), batch_size=bs, sampler=order.tolist(), drop_last=drop_last)
    return list(loader)


@pytest.mark.parametrize("name", list(_datasets()))
@pytest.mark.parametrize(("drop_last", "world"), [(False, 1), (True, 1), (False, 2)])
def test_fast_path_yields_the_per_sample_batches(name: str, drop_last: bool, world: int) -> None:
    ds = _datasets()[name]
    for rank in range(world):
        fast = make_loader(
            ds, batch_size=8, shuffle=True, seed=5, drop_last=drop_last, rank=rank, world=world
        )
        assert isinstance(fast, ArrayLoader), name
        for epoch, skip in ((0, 0), (1, 3), (2, 11)):
            start_epoch(fast, epoch, skip)
            got = list(fast)
            want = _reference(ds, fast.sampler.order(), 8, drop_last)
            assert len(got) == len(want) == len(fast)
            for a, b in zip(got, want, strict=True):
                assert len(a) == len(b) == 2
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_tensor_dataset_batches_are_collated_like_a_dataloader() -> None:
    x, y = _tensors()
    fast = make_loader(TensorDataset(x, y), batch_size=4, shuffle=False)
    slow = make_loader(TensorDataset(x, y), batch_size=4, shuffle=False, fast=False)
    assert isinstance(fast, ArrayLoader) and isinstance(slow, DataLoader)
    a, b = next(iter(fast)), next(iter(slow))
    assert type(a) is type(b) is list  # default_collate turns a tuple of samples into a list
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_getitems_is_called_once_per_batch_and_never_per_sample() -> None:
    x, y = _tensors(20)
    ds = WithGetitems(TensorDataset(x, y))
    loader = make_loader(ds, batch_size=8, shuffle=True, seed=1)
    assert isinstance(loader, ArrayLoader)  # not a DataLoader: no per-batch iterator machinery
    assert len(list(loader)) == 3
    assert ds.calls == 3 and ds.reads == 0


def test_what_cannot_gather_keeps_the_dataloader() -> None:
    x, y = _tensors(10)

    class Sub(TensorDataset):
        def __getitem__(self, i: int) -> Any:  # a subclass may change what a sample is
            return self.tensors[0][i] * 2, self.tensors[1][i]

    for ds in (PerSample(TensorDataset(x, y)), Subset(PerSample(TensorDataset(x, y)), [1, 2])):
        assert not is_batched(ds) and batch_gather(ds) is None
        assert isinstance(make_loader(ds, batch_size=4, shuffle=False), DataLoader)
    assert not is_batched(Sub(x, y)) and columns(Sub(x, y)) is None
    # workers or pinned memory: a DataLoader, collating TensorDataset samples (no pass-through)
    loader = make_loader(TensorDataset(x, y), batch_size=4, shuffle=False, pin_memory=True)
    assert isinstance(loader, DataLoader) and not returns_batches(TensorDataset(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pin_memory ... no accelerator is found" on CPU hosts
        xb, yb = next(iter(loader))
    assert torch.equal(xb, x[:4]) and torch.equal(yb, y[:4])


def _refuse(self: Any, i: int) -> Any:
    raise AssertionError("an in-memory dataset was read sample by sample")


class Counting(TensorDataset):
    """A TensorDataset subclass (slow path) that counts sample reads."""

    reads = 0

    def __getitem__(self, i: int) -> Any:
        Counting.reads += 1
        return super().__getitem__(i)


def test_infer_info_reads_each_sample_once_and_in_memory_none(monkeypatch) -> None:
    x, y = _tensors(30)
    y = y % 4
    Counting.reads = 0
    info = infer_info(Counting(x, y))
    assert Counting.reads == 30  # one pass, not two
    assert (info.task, info.input_shape, info.num_classes) == ("classification", (3,), 4)
    ds = PerSample(TensorDataset(x, y))
    cfg = Config.model_validate({"data": {"val_fraction": 0.2, "test_fraction": 0.1}})
    bundle = _as_bundle(ds, cfg, None)  # the stratified split reuses the same pass
    assert ds.reads == 30
    assert bundle.info == info
    monkeypatch.setattr(TensorDataset, "__getitem__", _refuse)  # in memory: read as columns
    assert infer_info(Subset(TensorDataset(x, y), list(range(30))[::-1])) == info
    assert infer_info(ArrayDataset(x, y)) == info
    reg = infer_info(TensorDataset(x, torch.randn(30, 2)))
    assert (reg.task, reg.num_outputs) == ("regression", 2)


def test_fit_data_as_numpy_pair_is_an_in_memory_dataset() -> None:
    x, y = _tensors(40)
    cfg = Config.model_validate({"data": {"val_fraction": 0.25, "test_fraction": 0.0}})
    bundle = _as_bundle((x.double().numpy(), (y % 3).numpy()), cfg, None)
    assert bundle.info.num_classes == 3 and bundle.val is not None
    assert is_batched(bundle.train)
    xb, yb = make_loader(bundle.train, batch_size=5, shuffle=False).__iter__().__next__()
    assert xb.dtype == torch.get_default_dtype() and yb.dtype == torch.int64
    assert torch.equal(xb, x[bundle.train.indices[:5]])

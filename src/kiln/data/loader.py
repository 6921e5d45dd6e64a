"""Loaders whose order is a pure function of (seed, epoch), so a run can resume mid-epoch exactly.

:class:`EpochSampler` draws epoch ``e``'s permutation from a generator seeded with ``(seed, e)``
and can start ``start`` samples into it: resuming after ``b`` batches replays exactly the batches
an uninterrupted run would have seen next, without reading the skipped ones.

Datasets that can gather a whole batch at once (in-memory tensors: Kiln's
:class:`~kiln.data.base.ArrayDataset` and torch's ``TensorDataset``; any dataset with
``__getitems__``; Subsets of these: :mod:`kiln.data.gather`) get an :class:`ArrayLoader`, one
gather per batch instead of one ``__getitem__`` per sample and a collate, with the same batches
in the same order.

Example:
    >>> import torch
    >>> from kiln.data.base import ArrayDataset
    >>> ds = ArrayDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    >>> loader = make_loader(ds, batch_size=4, shuffle=True, seed=0)
    >>> loader.sampler.set_epoch(0)
    >>> [len(y) for _, y in loader]
    [4, 4, 2]
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kiln.data.gather import gather_plan, returns_batches
from kiln.errors import DataError

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) pairs apart


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch that differs for every (seed, epoch) pair."""
    return (seed * _MIX + epoch * 0x632BE59BD9B4E019 + 1) % (2**63 - 1)


class EpochSampler(Sampler[int]):
    """Shuffled (or in-order) indices fixed by ``(seed, epoch)``, sharded over ranks, resumable.

    Every rank draws the same global order; after skipping the ``start`` samples already trained
    on, rank ``r`` of ``world`` takes every ``world``-th index from position ``r``. So the ranks'
    ``k``-th batches together are the ``k``-th global batch of a single process, whatever the
    world size: a run can resume on a different number of processes. With ``pad`` the remainder
    is padded (repeating its first indices) so every rank gets the same count, as DDP requires.

    Args:
        n: dataset length.
        shuffle: permute each epoch (else 0..n-1).
        seed: base seed of the permutations.
        rank: this process's rank.
        world: number of processes.
        pad: pad so all ranks get the same number of indices (training); else uneven (eval).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pad: bool = True,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world = world
        self.pad = pad
        self.epoch = 0
        self.start = 0

    @property
    def total(self) -> int:
        """Indices in one epoch over all ranks (``n`` padded up to a multiple of ``world``)."""
        return -(-self.n // self.world) * self.world if self.pad else self.n

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` samples (global count)."""
        if not 0 <= start <= self.total:
            raise ValueError(f"start must be in [0, {self.total}], got {start}")
        self.epoch = epoch
        self.start = start

    def order(self) -> torch.Tensor:
        """This rank's remaining indices for the epoch, as a tensor."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_seed(self.seed, self.epoch))
            full = torch.randperm(self.n, generator=g)
        else:
            full = torch.arange(self.n)
        if self.world == 1:
            return full[self.start :]
        short = self.total - self.n  # pad the whole epoch first: a resumed tail pads the same way
        if short:
            full = torch.cat([full, full.repeat(short // self.n + 1)[:short]])
        return full[self.start :][self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.total - self.start, self.world))


def _passthrough(batch: Any) -> Any:
    return batch


class ArrayLoader:
    """Batches gathered at once, one call per batch, in :class:`EpochSampler` order.

    What :func:`make_loader` returns for a dataset that can gather a whole batch
    (:func:`kiln.data.gather.gather_plan`: in-memory tensors, ``__getitems__``, Subsets of these)
    when no worker processes or pinned memory are asked for. It yields exactly the batches a
    ``DataLoader`` over the same sampler would, in the same order, without turning indices into
    Python lists and back or collating sample by sample, which is most of a small model's
    per-step data cost.
    """

    pin_memory = False
    generator: torch.Generator | None = None

    def __init__(
        self, dataset: Dataset[Any], *, batch_size: int, sampler: EpochSampler, drop_last: bool
    ) -> None:
        plan = gather_plan(dataset)
        if plan is None:
            raise TypeError(
                f"expected a dataset that gathers whole batches (kiln.data.gather), got "
                f"{type(dataset)}"
            )
        self.dataset = dataset
        self.gather, self.index = plan
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last

    def __len__(self) -> int:
        return batches_per_epoch(len(self.sampler), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Any]:
        order = self.sampler.order()
        if self.index is not None:  # compose the Subset index with the epoch's order once
            order = self.index[order]
        bs = self.batch_size
        stop = len(order) - len(order) % bs if self.drop_last else len(order)
        gather = self.gather
        for start in range(0, stop, bs):
            yield gather(order[start : start + bs])


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Number of batches a loader over ``n`` samples yields."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_sizes(n: int, batch_size: int, drop_last: bool) -> list[int]:
    """The size of every batch of an epoch (the last may be smaller unless ``drop_last``)."""
    full = n // batch_size
    sizes = [batch_size] * full
    if not drop_last and n % batch_size:
        sizes.append(n % batch_size)
    return sizes


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    fast: bool = True,
    rank: int = 0,
    world: int = 1,
    pad: bool = True,
) -> DataLoader[Any] | ArrayLoader:
    """A DataLoader over ``dataset`` with an :class:`EpochSampler`.

    ``pin_memory`` should be True only when batches go to a CUDA device; ``persistent_workers``
    applies only with workers. A dataset that gathers whole batches (:mod:`kiln.data.gather`),
    without workers or pinned memory, gets an :class:`ArrayLoader` (the same batches, less
    overhead) unless ``fast`` is False. The loader's own generator (which
    seeds worker processes) is reseeded per epoch by :func:`start_epoch`, so global RNG streams
    are never consumed by it.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(
            "cannot build a loader over an empty dataset; check data.path, data.classes and "
            "the split fractions"
        )
    sampler = EpochSampler(n, shuffle=shuffle, seed=seed, rank=rank, world=world, pad=pad)
    if fast and num_workers == 0 and not pin_memory and gather_plan(dataset) is not None:
        return ArrayLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(seed, 0))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
        collate_fn=_passthrough if returns_batches(dataset) else None,
        worker_init_fn=worker_init if num_workers > 0 else None,
        generator=generator,
    )


def start_epoch(loader: DataLoader[Any] | ArrayLoader, epoch: int, batches_done: int = 0) -> None:
    """Point ``loader`` at ``epoch``, skipping ``batches_done`` (global) batches already done."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError("start_epoch needs a loader built by kiln.data.make_loader")
    bs = loader.batch_size or 1  # per rank: the global batch is bs * world
    sampler.set_epoch(epoch, start=min(batches_done * bs * sampler.world, sampler.total))
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(sampler.seed + 1, epoch))

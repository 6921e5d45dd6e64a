"""The batch-size finder (see the package docstring)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from kiln.algorithms.finders._state import LossFn, preserved, train_step
from kiln.train.engine import Engine


class BatchSizeError(ValueError):
    """Not even the smallest batch size tried fits in memory (or in the budget)."""


@dataclass
class BatchTrial:
    """One tried batch size.

    Attributes:
        batch_size: The size tried.
        fits: Whether one training step ran within memory and the budget.
        peak_bytes: The measured peak memory of the step, None when it ran out of memory or
            the device has no measurement.
        reason: ``"fits"``, ``"out of memory"`` or ``"over budget"``.
    """

    batch_size: int
    fits: bool
    peak_bytes: int | None
    reason: str


@dataclass
class BatchFindResult:
    """What :func:`batch_find` found: the largest fitting batch size and every trial."""

    batch_size: int
    mode: str
    budget_bytes: int | None
    max_batch: int
    trials: list[BatchTrial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, ready for ``json.dumps``."""
        return asdict(self)


def _is_oom(exc: BaseException) -> bool:
    from kiln.train.microbatch import is_out_of_memory  # one rule for every OOM check

    return is_out_of_memory(exc)


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of parameters, gradients, buffers and optimizer state."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _cpu_peak_increment(fn: Callable[[], object]) -> int:
    """Peak of (CPU bytes allocated - bytes freed) while ``fn`` runs, from the profiler.

    The profiler's memory events record every allocation and free of the CPU allocator in
    order (``nbytes`` positive or negative); their running sum is the live tensor memory above
    the level at the start, and its maximum is the step's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    from kiln.perf.measure import cpu_peak_bytes

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return cpu_peak_bytes(prof)


def peak_step_memory(
    fn: Callable[[], object],
    device: torch.device,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int | None:
    """Peak memory in bytes while ``fn`` runs on ``device``; None where it cannot be measured.

    On CUDA it is ``torch.cuda.max_memory_allocated`` after resetting the peak: every tensor
    on the device counts. On the CPU (no allocator statistics in torch) it is the bytes already
    held by ``model`` and ``optimizer`` (parameters, gradients, buffers, state) plus the peak
    of the tensor memory allocated during ``fn``, measured with ``torch.profiler``
    (``profile_memory=True``); tensors outside the model and optimizer held before ``fn``
    starts are not counted. Kineto prints two lines per profile on stderr unless the
    environment variable ``KINETO_LOG_LEVEL=6`` is set before the first profile.

    Args:
        fn: The work to measure, e.g. one training step.
        device: The device it runs on.
        model: On the CPU, the model whose resident bytes to add.
        optimizer: On the CPU, the optimizer whose resident bytes to add.

    Returns:
        The peak in bytes, or None on devices other than CUDA and CPU.

    Example:
        >>> peak = peak_step_memory(lambda: torch.zeros(1024, 1024).sum(), torch.device("cpu"))
        >>> peak >= 4 * 1024 * 1024
        True
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        resident = 0
        if model is not None and optimizer is not None:
            resident = _resident_bytes(model, optimizer)
        return resident + _cpu_peak_increment(fn)
    fn()
    return None


def _free_device_memory(device: torch.device) -> None:
    gc.collect()  # an OOM's traceback frames may hold the activations until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _batch_source(data: Any, max_batch: int | None) -> tuple[Callable[[int], Any], int]:
    """A ``size -> batch`` function and the largest size to try."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not callable(data):
        from kiln.data.loader import make_loader

        n = len(data)
        if n == 0:
            raise ValueError("the dataset is empty; give batch_find a dataset with examples")

        def from_dataset(size: int) -> Any:
            return next(iter(make_loader(data, batch_size=size, shuffle=False)))

        return from_dataset, min(n, max_batch) if max_batch is not None else n
    if callable(data):
        if max_batch is None:
            raise ValueError(
                "batch_find(data=<function>) needs max_batch (the largest size to try); "
                "with a dataset it defaults to the dataset size"
            )
        return data, max_batch
    raise TypeError(
        f"data must be a Dataset (with __len__ and __getitem__) or a function size -> batch, "
        f"got {type(data).__name__}"
    )


def _too_big(trial: BatchTrial, budget_bytes: int | None, start: int) -> str:
    if trial.peak_bytes is None:
        shown = "ran out of memory"
    else:
        shown = (
            f"peaked at {trial.peak_bytes / 2**20:.1f} MiB, over the budget of "
            f"{(budget_bytes or 0) / 2**20:.1f} MiB"
        )
    return (
        f"not even batch size {start} fits: one training step {shown}; raise the budget, use a "
        "smaller model or a lower precision (precision=bf16)"
        + (", or a smaller start" if start > 1 else "")
    )


def batch_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    loss_fn: LossFn,
    *,
    mode: Literal["power", "binary"] = "power",
    budget_bytes: int | None = None,
    max_batch: int | None = None,
    start: int = 1,
    engine: Engine | None = None,
) -> BatchFindResult:
    """The largest batch size whose training step fits in memory and in ``budget_bytes``.

    A size fits when one training step (forward, loss, backward, optimizer step, with the
    Engine's autocast and update when given) neither raises ``torch.OutOfMemoryError`` (or a
    ``RuntimeError`` saying "out of memory") nor measures a peak (:func:`peak_step_memory`)
    above ``budget_bytes``. ``mode="power"`` tries ``start, 2*start, 4*start, ...`` up to
    ``max_batch`` (trying ``max_batch`` itself last) and returns the last size that fit;
    ``mode="binary"`` then bisects between the last fit and the first failure. Every trial
    starts from the original state, and everything is restored at the end (:func:`preserved`).

    Args:
        model: The model (the one returned by ``engine.setup`` when using an Engine).
        optimizer: Its optimizer; its state (e.g. Adam moments) is created in every trial, so
            it counts toward the peak.
        data: A dataset (batches are its first ``n`` examples) or a function ``n -> (inputs,
            targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar loss``.
        mode: ``"power"`` or ``"binary"``.
        budget_bytes: The memory budget; None means "until out of memory" (on the CPU, give a
            budget: the operating system swaps or kills a process before torch raises).
        max_batch: The largest size to try; default (and upper limit) the dataset size.
            Required when ``data`` is a function.
        start: The first size tried.
        engine: Use its device placement, precision and update.

    Returns:
        The largest fitting size, with every trial's size, outcome and peak.

    Raises:
        BatchSizeError: Even ``start`` does not fit (the message has the peak and the budget).
        ValueError: A bad argument, or a budget on a device without a measurement.

    Example:
        >>> model = nn.Linear(8, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> make = lambda n: (torch.randn(n, 8), torch.randint(0, 2, (n,)))
        >>> r = batch_find(model, opt, make, nn.functional.cross_entropy, max_batch=100)
        >>> r.batch_size, [t.batch_size for t in r.trials]
        (100, [1, 2, 4, 8, 16, 32, 64, 100])
    """
    if mode not in ("power", "binary"):
        raise ValueError(f"mode must be 'power' or 'binary', got {mode!r}")
    if start < 1:
        raise ValueError(f"start must be a batch size >= 1, got {start}")
    if budget_bytes is not None and budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0 (or None for no budget), got {budget_bytes}")
    if max_batch is not None and max_batch < start:
        raise ValueError(f"max_batch={max_batch} is below start={start}; raise max_batch")
    make_batch, cap = _batch_source(data, max_batch)
    if cap < start:
        raise ValueError(f"the dataset has {cap} examples, fewer than start={start}")
    device = engine.device if engine is not None else next(model.parameters()).device
    if budget_bytes is not None and device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"a memory budget needs a peak measurement, available on cuda and cpu, not on "
            f"{device.type}; drop the budget to search until out of memory"
        )
    trials: list[BatchTrial] = []

    def attempt(size: int, restore: Callable[[], None]) -> bool:
        oom = False
        peak: int | None = None
        model.train()  # every trial: restore() puts back the caller's train/eval modes
        try:
            peak = peak_step_memory(
                lambda: train_step(model, optimizer, make_batch(size), loss_fn, engine),
                device,
                model=model,
                optimizer=optimizer,
            )
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _is_oom(exc):
                raise
            oom = True
        finally:
            optimizer.zero_grad(set_to_none=True)
            restore()
        if oom:
            _free_device_memory(device)  # after the except block has dropped the traceback
            trials.append(BatchTrial(size, False, None, "out of memory"))
            return False
        over = budget_bytes is not None and peak is not None and peak > budget_bytes
        trials.append(BatchTrial(size, not over, peak, "over budget" if over else "fits"))
        return not over

    with preserved(model, optimizer, engine) as restore:
        best, failed = 0, None
        size = start
        while True:
            if not attempt(size, restore):
                failed = size
                break
            best = size
            if size >= cap:
                break
            size = min(size * 2, cap)
        if best == 0:
            raise BatchSizeError(_too_big(trials[-1], budget_bytes, start))
        if mode == "binary" and failed is not None:
            low, high = best, failed
            while high - low > 1:
                mid = (low + high) // 2
                if attempt(mid, restore):
                    low = mid
                else:
                    high = mid
            best = low
    return BatchFindResult(best, mode, budget_bytes, cap, trials)

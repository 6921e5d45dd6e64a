"""The two batchers of ``kiln serve``: what they gather, skip, refuse and retry."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kiln.deploy.serve.batcher import Batcher, LoopBatcher, QueueFull


def _double(sizes: list[int]):
    def predict(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any() and len(x) > 1:
            raise ValueError("a negative input spoils the batch")
        if (x < 0).any():
            raise ValueError("negative input")
        return x * 2

    return predict


def test_loop_batcher_gathers_one_iteration_into_one_forward() -> None:
    sizes: list[int] = []

    async def main() -> list[list[float]]:
        b = LoopBatcher(
            _double(sizes), max_batch=4, max_delay_ms=0, queue_size=16, on_batch=sizes.append
        )
        futs = [b.submit(torch.full((1, 2), float(i))) for i in range(6)]
        return [(await f)[0].tolist() for f in futs]

    answers = asyncio.run(main())
    assert answers == [[2.0 * i] * 2 for i in range(6)]
    assert sizes == [4, 2]  # six requests of one iteration: max_batch rows, then the rest


def test_loop_batcher_skips_timed_out_refuses_when_full_and_retries_alone() -> None:
    sizes: list[int] = []

    async def main() -> None:
        b = LoopBatcher(
            _double(sizes), max_batch=8, max_delay_ms=0, queue_size=3, on_batch=sizes.append
        )
        gone = b.submit(torch.ones(1, 2))
        gone.cancel()  # its request timed out before the flush
        good = b.submit(torch.ones(1, 2))
        bad = b.submit(-torch.ones(1, 2))
        with pytest.raises(QueueFull, match="full"):
            b.submit(torch.ones(1, 2))  # three queued (the cancelled one still counts)
        assert (await good).tolist() == [[2.0, 2.0]]  # answered despite its bad neighbour
        with pytest.raises(ValueError, match="negative input"):
            await bad

    asyncio.run(main())
    assert sizes[0] == 2  # the batch held good and bad, not the cancelled job


def test_loop_batcher_waits_for_a_fuller_batch_only_when_asked() -> None:
    sizes: list[int] = []

    async def main() -> float:
        b = LoopBatcher(
            _double(sizes), max_batch=4, max_delay_ms=50, queue_size=16, on_batch=sizes.append
        )
        t0 = time.perf_counter()
        first = b.submit(torch.ones(1, 2))
        await asyncio.sleep(0.01)
        second = b.submit(torch.ones(1, 2))
        await first, await second
        return time.perf_counter() - t0

    waited = asyncio.run(main())
    assert sizes == [2] and waited >= 0.045


def test_loop_batcher_drain_refuses_new_work() -> None:
    async def main() -> None:
        b = LoopBatcher(_double([]), max_batch=4, max_delay_ms=0, queue_size=4)
        f = b.submit(torch.ones(1, 2))
        await f
        assert b.drain(1.0)
        with pytest.raises(QueueFull, match="shutting down"):
            b.submit(torch.ones(1, 2))

    asyncio.run(main())


def test_thread_batcher_answers_each_request_and_isolates_a_bad_one() -> None:
    b = Batcher(_double([]), max_batch=8, max_delay_ms=20, queue_size=8)
    b.start()
    try:
        good = b.submit(torch.ones(2, 2))
        bad = b.submit(-torch.ones(1, 2))
        assert good.result(timeout=5).tolist() == [[2.0, 2.0], [2.0, 2.0]]
        with pytest.raises(ValueError, match="negative input"):
            bad.result(timeout=5)
    finally:
        b.stop()
    with pytest.raises(QueueFull, match="shutting down"):
        b.submit(torch.ones(1, 2))


@pytest.mark.parametrize("cls", [Batcher, LoopBatcher])
def test_bad_settings_are_refused(cls: type) -> None:
    with pytest.raises(ValueError, match="max_batch and queue_size must be >= 1"):
        cls(lambda x: x, max_batch=0, max_delay_ms=0, queue_size=1)

"""Epoch slices: several training loops in one process take turns, one slice of steps at a time.

On a small shared machine the load changes from second to second, so two loops measured one
after the other (even interleaved, in separate processes) see different machines and their ratio
wanders by tens of percent. Here every loop runs in its own thread, but only one runs at a time:
after each slice (an epoch) it hands a baton to the next, and a round gives every loop one
slice, in an order rotated every round. A loop's time for a round is the wall time of its slice
(the clock starts when it takes the baton and stops when it hands it on), so the ratio of two
loops in the same round compares them under the same load, a few tens of milliseconds apart.
The first slice of each loop (setup, first epoch) is a warm-up and is not timed.

The clock is the loop thread's CPU time (``time.thread_time``) by default: with one torch
thread every op of a CPU loop, backward included, runs in the thread that calls it, so this is
the loop's own work, without the time other processes held the core (on an idle core it equals
the wall time). ``clock=time.perf_counter`` measures wall time instead.

Example:
    >>> def counting(clock):        # any loop that calls clock.tick(step) after each update
    ...     for step in range(1, 7):
    ...         clock.tick(step)
    ...     return "done"
    >>> times, out = run_sliced({"a": counting, "b": counting}, per_slice=2, total=6)
    >>> [len(v) for v in times.values()], out["a"]
    ([2, 2], 'done')
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SliceClock", "run_sliced"]


class SliceClock:
    """Times a loop's slices and hands the baton on after each (``tick`` after every update)."""

    def __init__(
        self,
        name: str,
        per_slice: int,
        total: int,
        baton: _Baton,
        clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.name, self.per_slice, self.total, self.baton = name, per_slice, total, baton
        self.clock = clock
        self.us_per_step: list[float] = []
        self._t = 0.0

    def tick(self, step: int) -> None:
        if step % self.per_slice:
            return
        now = self.clock()
        if step > self.per_slice:  # the first slice holds the setup: a warm-up
            self.us_per_step.append((now - self._t) / self.per_slice * 1e6)
        if step >= self.total:
            self.baton.done.set()  # finished: hand on for good
            return
        self.baton.pass_on(self.name)
        self._t = self.clock()


class _Baton:
    def __init__(self, names: list[str]) -> None:
        self.go = {n: threading.Event() for n in names}
        self.done = threading.Event()

    def pass_on(self, name: str) -> None:
        self.done.set()
        self.go[name].wait()
        self.go[name].clear()

    def give(self, name: str) -> None:
        self.done.clear()
        self.go[name].set()
        self.done.wait()


def run_sliced(
    runners: dict[str, Callable[[SliceClock], Any]],
    *,
    per_slice: int,
    total: int,
    clock: Callable[[], float] = time.thread_time,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every loop to ``total`` steps in turns of ``per_slice`` steps.

    Returns each loop's time per step in every timed slice (round ``r`` is index ``r`` in every
    list) and what each runner returned.
    """
    if total % per_slice or total < 2 * per_slice:
        raise ValueError(f"total ({total}) must be a multiple of per_slice ({per_slice}), >= 2x")
    names = list(runners)
    baton = _Baton(names)
    clocks = {n: SliceClock(n, per_slice, total, baton, clock) for n in names}
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def target(name: str) -> None:
        try:
            results[name] = runners[name](clocks[name])
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            baton.done.set()

    threads = {n: threading.Thread(target=target, args=(n,), daemon=True) for n in names}
    for n in names:  # setup and the warm-up slice, one loop at a time
        baton.done.clear()
        threads[n].start()
        baton.done.wait()
        if errors:
            raise errors[0]
    for r in range(total // per_slice - 1):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            baton.give(n)
            if errors:
                raise errors[0]
    for t in threads.values():
        t.join(timeout=60)
    return {n: c.us_per_step for n, c in clocks.items()}, results

"""SIGINT/SIGTERM during a fit: stop after the current update, save a checkpoint, raise.

A second signal stops at once. Only the main thread can install signal handlers; elsewhere the
context does nothing.

Example:
    >>> asked = []
    >>> with stop_on_signals(lambda reason, interrupt: asked.append((reason, interrupt))):
    ...     signal.raise_signal(signal.SIGTERM)
    >>> asked
    [('SIGTERM', True)]
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["stop_on_signals"]


@contextmanager
def stop_on_signals(request_stop: Callable[..., None]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``request_stop(name, interrupt=True)``; a second one raises
    ``KeyboardInterrupt`` at once. The previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        received.append(name)
        request_stop(name, interrupt=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

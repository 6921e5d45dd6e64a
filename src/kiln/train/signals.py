"""SIGINT/SIGTERM during a fit: stop after the current update, save a checkpoint, raise.

A second Ctrl-C stops at once. Only the main thread can install signal handlers; elsewhere the
context does nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.train.trainer import Trainer

__all__ = ["stop_on_signals"]


@contextmanager
def stop_on_signals(self: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current update and save."""
    if threading.current_thread() is not threading.main_thread():
        with nullcontext():
            yield
        return

    def handler(signum: int, frame: Any) -> None:
        if self._stop_reason:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.request_stop(signal.Signals(signum).name, interrupt=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

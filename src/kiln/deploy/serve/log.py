"""Rate-limited logging for ``kiln serve``: one line per kind of event per interval.

A flood of bad requests or of connections must not flood the log: under 20,000 idle connections
an unlimited server wrote 179 MB of stderr in a minute. :class:`RateLimitedLog` writes the first
event of a kind, drops the repeats for ``interval_s`` seconds, and then writes the next one with
the number it dropped (``... (412 more like this since the last such line)``), so the log still
says how often it happened.

Example:
    >>> import logging
    >>> limited = RateLimitedLog(logging.getLogger("kiln.serve"), interval_s=10.0)
    >>> limited.warning("400", "refused a request: 400 malformed request line")
    True
    >>> limited.warning("400", "refused a request: 400 malformed request line")
    False
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedLog"]

_MAX_KINDS = 256  # distinct kinds remembered; bounds memory if kinds come from messages


class RateLimitedLog:
    """Writes at most one line per kind per ``interval_s``; counts the ones it drops.

    Args:
        logger: where the lines go.
        interval_s: the shortest time between two lines of one kind.
        clock: seconds, monotonic (a parameter so tests can drive it).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start with nothing seen."""
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._seen: dict[str, list[float]] = {}  # kind -> [time of last line, dropped since]
        self._lock = threading.Lock()  # the event loop and the batcher thread both log

    def warning(self, kind: str, message: str, *, exc_info: Any = None) -> bool:
        """Log ``message`` unless a line of ``kind`` went out less than ``interval_s`` ago.

        Returns:
            True when the line was written, False when it was counted and dropped.
        """
        now = self.clock()
        with self._lock:
            entry = self._seen.get(kind)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return False
            dropped = int(entry[1]) if entry is not None else 0
            self._seen.pop(kind, None)
            if len(self._seen) >= _MAX_KINDS:
                self._seen.pop(next(iter(self._seen)))
            self._seen[kind] = [now, 0]
        if dropped:
            message += f" ({dropped} more like this since the last such line)"
        self.logger.warning(message, exc_info=exc_info)
        return True

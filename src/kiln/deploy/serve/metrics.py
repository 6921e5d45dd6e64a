"""Prometheus text metrics for ``kiln serve``: counters, histograms and a gauge, thread-safe.

Only the standard library is used; :meth:`ServeMetrics.render` returns the text exposition
format (version 0.0.4) that ``GET /metrics`` sends.

Example:
    >>> m = ServeMetrics()
    >>> m.observe_request(200, 0.004)
    >>> "kiln_serve_requests_total{code=\\"200\\"} 1" in m.render(queue_depth=0)
    True
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = ["Histogram", "ServeMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """A cumulative histogram with fixed upper bounds (not locked; the owner holds a lock)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        """Create an empty histogram.

        Args:
            buckets: increasing upper bounds; ``+Inf`` is added.
        """
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` lines of this histogram."""
        out: list[str] = []
        acc = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            acc += count
            label = f"{bound:g}"
            out.append(f'{name}_bucket{{le="{label}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


class ServeMetrics:
    """Request, error, latency and batch-size statistics of one server."""

    def __init__(self) -> None:
        """Start every counter at zero."""
        self._lock = threading.Lock()
        self.by_code: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)

    def observe_request(self, code: int, seconds: float) -> None:
        """Count one answered request with its status code and latency."""
        with self._lock:
            self.by_code[code] = self.by_code.get(code, 0) + 1
            self.latency.observe(seconds)

    def observe_error(self, kind: str) -> None:
        """Count one error (``invalid_json``, ``validation``, ``timeout``, ``internal``...)."""
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe_batch(self, rows: int) -> None:
        """Count one forward pass over ``rows`` examples."""
        with self._lock:
            self.batch.observe(rows)

    def render(self, *, queue_depth: int) -> str:
        """The Prometheus text exposition of every metric."""
        with self._lock:
            lines = [
                "# HELP kiln_serve_requests_total HTTP requests answered, by status code.",
                "# TYPE kiln_serve_requests_total counter",
            ]
            lines += [
                f'kiln_serve_requests_total{{code="{c}"}} {n}'
                for c, n in sorted(self.by_code.items())
            ]
            lines += [
                "# HELP kiln_serve_errors_total Failed requests, by kind.",
                "# TYPE kiln_serve_errors_total counter",
            ]
            lines += [
                f'kiln_serve_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())
            ]
            lines += [
                "# HELP kiln_serve_request_seconds Time from request read to answer.",
                "# TYPE kiln_serve_request_seconds histogram",
                *self.latency.lines("kiln_serve_request_seconds"),
                "# HELP kiln_serve_batch_size Examples per forward pass.",
                "# TYPE kiln_serve_batch_size histogram",
                *self.batch.lines("kiln_serve_batch_size"),
                "# HELP kiln_serve_queue_depth Requests waiting for a forward pass.",
                "# TYPE kiln_serve_queue_depth gauge",
                f"kiln_serve_queue_depth {queue_depth}",
            ]
        return "\n".join(lines) + "\n"

"""``RateLimitedLog``: one line per kind per interval, and the count of the dropped ones."""

from __future__ import annotations

import logging

import pytest

from kiln.deploy.serve.log import RateLimitedLog


def test_one_line_per_kind_per_interval_with_the_dropped_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("kiln.serve.test"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kiln.serve.test"):
        assert limited.warning("400", "bad request line")
        assert not any(limited.warning("400", "bad request line") for _ in range(999))
        assert limited.warning("408", "too slow")  # another kind is not held back
        now[0] = 10.5
        assert limited.warning("400", "bad request line")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "bad request line",
        "too slow",
        "bad request line (999 more like this since the last such line)",
    ]

"""stop_on_signals alone: a signal asks for an interrupting stop, a second one stops at once."""

from __future__ import annotations

import signal
import threading

import pytest

from kiln.train.signals import stop_on_signals


def test_first_signal_requests_a_stop_second_raises_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    asked: list[tuple[str, bool]] = []

    def request_stop(reason: str, *, interrupt: bool = False) -> None:
        asked.append((reason, interrupt))

    with pytest.raises(KeyboardInterrupt), stop_on_signals(request_stop):
        signal.raise_signal(signal.SIGTERM)
        assert asked == [("SIGTERM", True)]
        signal.raise_signal(signal.SIGINT)  # the second one: stop now
    assert asked == [("SIGTERM", True)]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen: list[object] = []

    def run() -> None:
        with stop_on_signals(lambda *a, **k: None):
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [before]

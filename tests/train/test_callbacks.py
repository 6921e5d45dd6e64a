"""``kiln.train.callbacks.Callbacks`` on its own: which methods are called, in which order.

The dispatch is tested with plain recorder objects and no Trainer: every event the trainer
may fire, callbacks that listen to only some events, misspelled event names, and a callback
that raises.
"""

from __future__ import annotations

from typing import Any

import pytest

from kiln.train.callbacks import EVENTS, Callbacks


class Recorder:
    """Listens to every event and appends ``(name, event, args)`` to a shared list."""

    def __init__(self, name: str, calls: list[tuple[str, str, tuple[Any, ...]]]) -> None:
        self.name, self.calls = name, calls

    def _record(self, event: str, *args: Any) -> None:
        self.calls.append((self.name, event, args))


for _event in EVENTS:
    # one real method per event, as a user's class would define them
    setattr(
        Recorder,
        _event,
        (lambda ev: lambda self, *args: self._record(ev, *args))(_event),
    )


def test_events_fire_in_the_order_given_with_their_arguments() -> None:
    calls: list[tuple[str, str, tuple[Any, ...]]] = []
    cbs = Callbacks([Recorder("a", calls)])
    for i, event in enumerate(EVENTS):
        cbs.fire(event, "trainer", i)
    assert calls == [("a", event, ("trainer", i)) for i, event in enumerate(EVENTS)]


def test_callbacks_of_one_event_run_in_registration_order() -> None:
    calls: list[tuple[str, str, tuple[Any, ...]]] = []
    cbs = Callbacks([Recorder("first", calls), Recorder("second", calls), Recorder("third", calls)])
    cbs.fire("on_log", None, {"train/loss": 1.0})
    cbs.fire("on_fit_end", None, "result")
    assert [(name, event) for name, event, _ in calls] == [
        ("first", "on_log"),
        ("second", "on_log"),
        ("third", "on_log"),
        ("first", "on_fit_end"),
        ("second", "on_fit_end"),
        ("third", "on_fit_end"),
    ]


def test_a_callback_without_a_method_is_skipped_for_that_event() -> None:
    seen: list[int] = []

    class OnlyUpdates:
        def on_update_end(self, trainer: object, step: int) -> None:
            seen.append(step)

    cbs = Callbacks([OnlyUpdates(), object()])  # an object with no on_* method at all is fine
    assert cbs.has("on_update_end") and not cbs.has("on_log")
    for event in EVENTS:
        cbs.fire(event, None, 7)  # the events it does not define are no-ops for it
    assert seen == [7]
    assert not Callbacks().has("on_fit_start")  # no callbacks: every event is free


def test_inherited_methods_are_found() -> None:
    seen: list[str] = []

    class Base:
        def on_epoch_start(self, trainer: object, epoch: int) -> None:
            seen.append(f"epoch {epoch}")

    class Child(Base):
        pass

    Callbacks([Child()]).fire("on_epoch_start", None, 3)
    assert seen == ["epoch 3"]


def test_a_misspelled_method_is_refused_with_the_event_list() -> None:
    class Typo:
        def on_epoch_begin(self, trainer: object, epoch: int) -> None:  # on_epoch_start
            pass

    with pytest.raises(ValueError) as info:
        Callbacks([Typo()])
    msg = str(info.value)
    assert "Typo.on_epoch_begin is not a Kiln event" in msg
    assert all(event in msg for event in EVENTS)


def test_firing_an_unknown_event_raises_instead_of_calling_nobody() -> None:
    cbs = Callbacks([Recorder("a", [])])
    with pytest.raises(KeyError, match="on_batch_end"):
        cbs.fire("on_batch_end", None)
    with pytest.raises(KeyError):
        cbs.has("on_batch_end")


def test_an_exception_in_a_callback_propagates_and_stops_the_rest() -> None:
    boom = RuntimeError("callback failed")
    calls: list[tuple[str, str, tuple[Any, ...]]] = []

    class Fails:
        def on_log(self, trainer: object, metrics: dict[str, float]) -> None:
            raise boom

    cbs = Callbacks([Recorder("before", calls), Fails(), Recorder("after", calls)])
    with pytest.raises(RuntimeError) as info:
        cbs.fire("on_log", None, {})
    assert info.value is boom  # the callback's own exception, not wrapped or swallowed
    assert [name for name, _, _ in calls] == ["before"]


def test_the_items_keep_the_callbacks_given() -> None:
    a, b = Recorder("a", []), object()
    assert Callbacks([a, b]).items == [a, b]

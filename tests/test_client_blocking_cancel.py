"""
L{Blocking._call}'s Ctrl-C before the reactor's thread has started the
call: a unit test with a reactor that runs what it is handed only when told.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from transcoder.client.blocking import Blocking


class HeldReactor:
    """C{callFromThread} that keeps the calls, in order, until L{run}."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        self.calls.append(lambda: f(*args))

    def run(self) -> None:
        while self.calls:
            self.calls.pop(0)()


class InterruptedQueue(queue.Queue[Any]):
    """A queue whose C{get} is cut short by a Ctrl-C, as the blocked main thread's is."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        raise KeyboardInterrupt


def _held_client(monkeypatch: pytest.MonkeyPatch) -> tuple[Blocking, HeldReactor]:
    reactor = HeldReactor()
    client = Blocking.__new__(Blocking)
    client._reactor = reactor  # type: ignore[assignment]
    monkeypatch.setattr("transcoder.client.blocking.queue.Queue", InterruptedQueue)
    return client, reactor


def test_a_ctrl_c_before_the_call_started_means_it_never_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C that lands before the reactor's thread has begun the call: the call is never begun (no submit goes on in the background)."""
    client, reactor = _held_client(monkeypatch)
    begun: list[Deferred[None]] = []

    def call() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        begun.append(d)
        return d

    with pytest.raises(KeyboardInterrupt):
        client._call(call)
    reactor.run()
    assert begun == []


def test_a_ctrl_c_cancels_a_call_the_main_thread_had_not_seen_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancel is looked at in the reactor's thread: a call that started after the main thread's Ctrl-C but before its cancel ran is cancelled."""
    client, reactor = _held_client(monkeypatch)
    begun: list[Deferred[None]] = []
    cancelled: list[Deferred[None]] = []

    def call() -> Deferred[None]:
        d: Deferred[None] = Deferred(cancelled.append)
        begun.append(d)
        return d

    with pytest.raises(KeyboardInterrupt):
        client._call(call)
    # The start the reactor's thread had already taken on: run it as if the flag came too late.
    start = reactor.calls.pop(0)
    monkeypatch.setattr("transcoder.client.blocking.threading.Event.is_set", lambda self: False)
    start()
    reactor.run()
    assert len(begun) == 1
    assert cancelled == begun

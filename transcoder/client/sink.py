"""Receiving a download's body into a file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone


class Sink(Protocol):
    """
    Receives a response body into a file, hashing it, and drops a connection
    that stays silent for C{idle} seconds (so a stalled download resumes).
    """

    def __init__(
        self,
        reactor: Any,
        out: Any,
        digest: Any,
        on_data: Callable[[int], None],
        idle: float,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._reactor = reactor
        self._out = out
        self._digest = digest
        self._on_data = on_data
        self._idle = idle
        self._timer: Any = None
        self.timed_out = False

    def connectionMade(self) -> None:
        self._timer = self._reactor.callLater(self._idle, self._silent)

    def _silent(self) -> None:
        self.timed_out = True
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        self._out.write(data)
        self._digest.update(data)
        self._on_data(len(data))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)

"""
Retrying through a restart of the server, and bounding silences: the
pauses between tries of a failing request, and a watchdog that cancels a
request which stops moving.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.web.client import ResponseFailed

from transcoder.client.errors import TranscoderError


class Streak:
    """
    Failures in a row: each is retried after a growing pause while there have
    been at most C{retries} of them or the first is under C{period} seconds old.
    """

    def __init__(self, reactor: Any, retries: int, period: float) -> None:
        self._reactor = reactor
        self._retries = retries
        self._period = period
        self.count = 0
        self._since: float | None = None

    def reset(self) -> None:
        self.count, self._since = 0, None

    def failed(self) -> float | None:
        """Count a failure; the pause before the next try, or None to give up."""
        now = self._reactor.seconds()
        if self._since is None:
            self._since = now
        self.count += 1
        if self.count > self._retries and now - self._since >= self._period:
            return None
        return float(min(0.25 * 2 ** (self.count - 1), 5.0))


def retryable(e: BaseException) -> bool:
    """A failure that a server being restarted gives: worth trying again."""
    # Before TranscoderError: CannotConnect and ConnectionLost are both.
    if isinstance(e, (ConnectError, ResponseFailed)):
        return True
    if isinstance(e, TranscoderError):
        return e.status == 503
    return False


class Watchdog:
    """
    Cancels C{d} unless L{feed} is called within the current limit; records
    which limit ran out in C{expired} (seconds, label).
    """

    def __init__(self, reactor: Any, d: Deferred[Any], seconds: float, label: str) -> None:
        self.expired: tuple[float, str] | None = None
        self._d = d
        self._limit = (seconds, label)
        self._call = reactor.callLater(seconds, self._expire)

    def feed(self, seconds: float, label: str) -> None:
        if self._call.active():
            self._limit = (seconds, label)
            self._call.reset(seconds)

    def stop(self) -> None:
        if self._call.active():
            self._call.cancel()

    def _expire(self) -> None:
        self.expired = self._limit
        self._d.cancel()

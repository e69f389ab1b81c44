"""
What the core refuses, in its own words: a stable code and a message.

The HTTP layer maps each kind to a status in one table
(L{transcoder.http.errors}); the core never names a status itself.
"""

from __future__ import annotations


class DomainError(Exception):
    """
    A refusal to report to whoever asked.

    @ivar code: a stable machine-readable identifier, e.g. C{"queue_full"}.
    @ivar message: a human-readable explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Invalid(DomainError):
    """The request itself is wrong (an unknown profile or parameter, a bad value)."""


class NotFound(DomainError):
    """No such job, upload or file."""


class Unavailable(DomainError):
    """
    The service cannot take it now (a full queue, shutting down, a failing
    store); the same request may succeed later.

    @ivar retry_after: seconds after which trying again is reasonable.
    """

    def __init__(self, code: str, message: str, retry_after: int) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after

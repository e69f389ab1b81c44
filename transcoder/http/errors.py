"""
The one error type the HTTP API answers with, its JSON form, and the one
table that maps the core's refusals (L{transcoder.core.errors}) to statuses.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from transcoder.core.errors import DomainError, Invalid, NotFound, Unavailable

# Each kind of the core's refusals, and the status it is answered with.
_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (Invalid, 422),
    (NotFound, 404),
    (Unavailable, 503),
)


def status_phrase(status: int) -> str:
    """The standard reason phrase of C{status} (Twisted knows none for some, 422 among them)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class APIError(DomainError):
    """
    A failure to report to the client as C{{"error": {"code", "message"}}},
    with its HTTP status.

    @ivar status: the HTTP status code.
    @ivar code: a stable machine-readable identifier, e.g. C{"unknown_profile"}.
    @ivar message: a human-readable explanation.
    @ivar headers: extra response headers (C{Allow}, C{Retry-After}).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.args = (f"{status} {code}: {message}",)
        self.status = status
        self.headers = dict(headers or {})

    @property
    def phrase(self) -> str:
        return status_phrase(self.status)

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}

    def body(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8") + b"\n"


def not_found(what: str = "resource") -> APIError:
    return APIError(404, "not_found", f"no such {what}")


def method_not_allowed(method: str, allowed: list[str]) -> APIError:
    return APIError(
        405,
        "method_not_allowed",
        f"{method} is not allowed here; use {', '.join(allowed)}",
        {"Allow": ", ".join(allowed)},
    )


def http_error(error: DomainError) -> APIError:
    """C{error} as the HTTP API answers it."""
    if isinstance(error, APIError):
        return error
    for kind, status in _STATUS:
        if isinstance(error, kind):
            headers = {}
            if isinstance(error, Unavailable):
                headers["Retry-After"] = str(error.retry_after)
            return APIError(status, error.code, error.message, headers)
    return APIError(500, "internal", error.message)

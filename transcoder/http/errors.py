"""The one error type the HTTP API answers with, and its JSON form."""

from __future__ import annotations

import json
from http import HTTPStatus


def status_phrase(status: int) -> str:
    """The standard reason phrase of C{status} (Twisted knows none for some, 422 among them)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class APIError(Exception):
    """
    A failure to report to the client as C{{"error": {"code", "message"}}}.

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
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
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

"""
Small HTTP helpers shared by the resources and the request: JSON answers and
errors, and the base resources that answer in JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from transcoder import _twisted
from transcoder.core.errors import DomainError
from transcoder.http.errors import APIError, http_error, method_not_allowed, status_phrase

JSON_TYPE = b"application/json"


def json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


# Longer numbers are past any file or body (an exabyte).
_MAX_DIGITS = 18


def capped_int(digits: str) -> int:
    """
    The number that C{digits} (ASCII digits) write, capped at 10**18: Python
    refuses to convert more than 4300 digits, leading zeros included, and a
    client may send more.
    """
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def write_json(request: Request, status: int, obj: Any) -> bytes:
    """Set the status and type of a JSON answer; return the body for a render method."""
    # Twisted knows no phrase for some codes (422 would go out as "Unknown Status").
    request.setResponseCode(status, status_phrase(status).encode("ascii"))
    request.setHeader(b"Content-Type", JSON_TYPE)
    request.setHeader(b"Cache-Control", b"no-store")
    return json_body(obj)


def write_error(request: Request, refusal: DomainError) -> bytes:
    error = http_error(refusal)
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return write_json(request, error.status, error.to_json())


def finish_error(request: Request, error: DomainError) -> None:
    """Answer an asynchronous request with an error, unless the client has gone."""
    if _twisted.disconnected(request) or request.finished:
        return
    body = write_error(request, error)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def raw_response(refusal: DomainError, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """
    A complete HTTP/1.1 response, for answering from inside C{gotLength} or
    mid-body, where twisted.web's own response machinery cannot yet be used.
    C{extra}: more headers (the CORS ones routing set).
    """
    error = http_error(refusal)
    body = error.body()
    lines = [
        f"HTTP/1.1 {error.status} {error.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in error.headers.items()]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _renders(resource: object, name: str) -> bool:
    # Resource's own render_HEAD only calls render_GET: it counts only with one.
    if name == "render_HEAD" and getattr(type(resource), name, None) is Resource.render_HEAD:
        return False
    return name.startswith("render_")


def allowed_methods(resource: IResource) -> list[str]:
    """The methods a resource renders, from its C{render_*} methods."""
    methods = {name[len("render_") :] for name in dir(resource) if _renders(resource, name)}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class ErrorResource(Resource):
    """Answers every request with one error."""

    isLeaf = True

    def __init__(self, error: DomainError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        return write_error(request, self.error)


class JSONResource(Resource):
    """A resource whose unsupported methods get a JSON 405 with C{Allow}."""

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, "render_" + method, None)
        if handler is not None and not _renders(self, "render_" + method):
            handler = None
        if handler is None and method == "HEAD":
            handler = getattr(self, "render_GET", None)
        if handler is None:
            return write_error(request, method_not_allowed(method, allowed_methods(self)))
        result: bytes | int = handler(request)
        return result

    def getChild(self, path: bytes, request: Request) -> Resource:  # type: ignore[override]
        return ErrorResource(APIError(404, "not_found", "no such resource"))


def disconnected(request: Request) -> bool:
    return bool(request.finished or _twisted.disconnected(request))


def finish_json(request: Request, status: int, obj: Any) -> None:
    """Answer an asynchronous request with JSON, unless the client has gone."""
    if disconnected(request):
        return
    body = write_json(request, status, obj)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


class EndResource(JSONResource):
    """A resource with no children: C{/x/} is C{/x}, and C{/x/y} a JSON 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:  # type: ignore[override]
        if path == b"" and not request.postpath:
            return self
        return super().getChild(path, request)

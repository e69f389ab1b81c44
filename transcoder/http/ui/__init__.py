"""
C{/ui/}: the web page (issue 19) and the files it loads, served from this
package's C{static} directory.

Only the files found there at start-up are served, each with a type chosen by
its extension (a file of another extension stops the start: it would go out
mistyped); anything else, directories included, is a JSON 404, so there is no
listing.  Every answer under C{/ui/} carries a C{Content-Security-Policy} that
lets the page load, connect to and submit to this server alone, and no inline
script or style.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from twisted.web import server

from transcoder.http.errors import APIError
from transcoder.http.responses import JSONResource, write_error

STATIC = Path(__file__).resolve().parent / "static"

# 'self' only: no other host, no inline script or style, no plugins, no framing by others.
CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    b"frame-ancestors 'self'"
)

TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".txt": b"text/plain; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
    ".map": b"application/json",
}


@dataclass(frozen=True)
class StaticFile:
    content_type: bytes
    body: bytes
    etag: bytes


def load(directory: Path) -> dict[str, StaticFile]:
    """
    Every file under C{directory}, by its path relative to it (C{/}-separated).

    @raise ValueError: for a file whose extension has no known type.
    """
    files: dict[str, StaticFile] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        kind = TYPES.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: no content type known for {path.suffix!r}")
        body = path.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'
        files[path.relative_to(directory).as_posix()] = StaticFile(kind, body, etag)
    return files


def wants_html(request: server.Request) -> bool:
    """Whether the client asks for HTML by name (a browser does; curl's C{*/*} does not)."""
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept") or [])
    return any(
        part.split(b";", 1)[0].strip().lower() == b"text/html" for part in accept.split(b",")
    )


class RedirectToUI(JSONResource):
    """C{/} for a browser: to the page."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"Location", b"/ui/")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Vary", b"Accept")
        return b"/ui/\n"


class UIResource(JSONResource):
    """The page's files; C{/ui} itself redirects to C{/ui/}, whose relative links need it."""

    isLeaf = True

    def __init__(self, directory: Path = STATIC) -> None:
        super().__init__()
        self.files = load(directory)

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Security-Policy", CSP)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        if not request.postpath:
            request.setResponseCode(301)
            request.setHeader(b"Location", b"/ui/")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"/ui/\n"
        try:
            name = b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            name = "\0"
        found = self.files.get(name or "index.html")
        if found is None:
            return write_error(request, APIError(404, "not_found", "no such resource"))
        request.setHeader(b"Content-Type", found.content_type)
        request.setHeader(b"ETag", found.etag)
        # Checked again on every load, so that a new version of the page is never half-cached.
        request.setHeader(b"Cache-Control", b"no-cache")
        if found.etag in _etags(request):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Length", b"%d" % len(found.body))
        return found.body


def _etags(request: server.Request) -> list[bytes]:
    header = b",".join(request.requestHeaders.getRawHeaders(b"if-none-match") or [])
    return [tag.strip() for tag in header.split(b",") if tag.strip()]

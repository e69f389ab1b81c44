"""
The tus 1.0 protocol's headers: what this server offers, how the request
headers are read (each problem an L{APIError} that carries C{Tus-Resumable}),
and CORS for the browsers that speak it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from email.utils import formatdate
from typing import Any

from twisted.web import server

from transcoder.http.errors import APIError
from transcoder.http.responses import capped_int

VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum"
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
OFFSET_TYPE = b"application/offset+octet-stream"
# Not part of tus: the job a finished upload became.
JOB_LOCATION = "Job-Location"
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Upload-Offset, Upload-Length, Upload-Metadata, "
    "Upload-Defer-Length, Upload-Checksum, Upload-Concat, Tus-Resumable, "
    "X-HTTP-Method-Override, X-Requested-With, Content-Digest, Repr-Digest"
)
CORS_EXPOSE_HEADERS = (
    "Upload-Offset, Location, Upload-Length, Upload-Metadata, Upload-Defer-Length, "
    "Upload-Expires, Tus-Version, Tus-Resumable, Tus-Max-Size, Tus-Extension, "
    "Tus-Checksum-Algorithm, Job-Location"
)
CORS_METHODS = "POST, GET, HEAD, PATCH, DELETE, OPTIONS"

_DIGITS = re.compile(r"^[0-9]{1,30}$")
_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_METADATA = 16 * 1024


def tus_error(status: int, code: str, message: str, **headers: str) -> APIError:
    """An L{APIError} that also says C{Tus-Resumable}, as every tus answer must."""
    extra = {"Tus-Resumable": VERSION}
    extra.update({k.replace("_", "-"): v for k, v in headers.items()})
    return APIError(status, code, message, extra)


def with_tus(error: APIError) -> APIError:
    """C{error}, answering with C{Tus-Resumable} too."""
    return APIError(
        error.status, error.code, error.message, {"Tus-Resumable": VERSION, **error.headers}
    )


def header(request: server.Request, name: str) -> str | None:
    value = request.requestHeaders.getRawHeaders(name.encode("ascii"), [None])[-1]
    return None if value is None else value.decode("latin-1").strip()


def check_resumable(request: server.Request) -> None:
    """412 without C{Tus-Resumable: 1.0.0}."""
    if header(request, "Tus-Resumable") != VERSION:
        raise tus_error(
            412,
            "unsupported_version",
            f"Tus-Resumable: {VERSION} is required",
            Tus_Version=VERSION,
        )


def method_of(request: server.Request) -> bytes:
    """The request's method, or on a POST the one C{X-HTTP-Method-Override} names."""
    method: bytes = request.method
    if method == b"POST":
        override = header(request, "X-HTTP-Method-Override")
        if override:
            return override.upper().encode("ascii", "replace")
    return method


def number(request: server.Request, name: str) -> int | None:
    """A non-negative integer header, or None when absent; 400 otherwise."""
    raw = header(request, name)
    if raw is None:
        return None
    if not _DIGITS.match(raw):
        raise tus_error(400, "bad_header", f"{name} must be a non-negative integer")
    return capped_int(raw)


def parse_metadata(raw: str | None) -> dict[str, str]:
    """
    C{Upload-Metadata}: comma-separated C{key base64value} pairs, a key
    alone for an empty value.  400 for what is not that, or not UTF-8.
    """
    out: dict[str, str] = {}
    if raw is None or not raw.strip():
        return out
    if len(raw) > MAX_METADATA:
        raise tus_error(400, "bad_metadata", f"Upload-Metadata is over {MAX_METADATA} bytes")
    for pair in raw.split(","):
        parts = pair.strip().split(" ")
        key = parts[0]
        if not _KEY.match(key) or len(parts) > 2 or key in out:
            raise tus_error(400, "bad_metadata", f"Upload-Metadata: bad pair {pair.strip()[:64]!r}")
        value = ""
        if len(parts) == 2:
            try:
                value = base64.b64decode(parts[1], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise tus_error(
                    400, "bad_metadata", f"Upload-Metadata: {key!r} is not base64 of UTF-8"
                ) from None
        out[key] = value
    return out


def encode_metadata(metadata: dict[str, str]) -> str:
    return ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}" if v else k for k, v in metadata.items()
    )


def parse_checksum(request: server.Request) -> tuple[str, bytes] | None:
    """C{Upload-Checksum: <algorithm> <base64>}: 400 for a malformed one or another algorithm."""
    raw = header(request, "Upload-Checksum")
    if raw is None:
        return None
    algorithm, _, value = raw.partition(" ")
    if algorithm not in CHECKSUMS:
        raise tus_error(
            400,
            "bad_checksum_algorithm",
            f"Upload-Checksum: algorithm must be one of {', '.join(CHECKSUMS)}",
        )
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != CHECKSUMS[algorithm]().digest_size:
        raise tus_error(400, "bad_checksum", "Upload-Checksum: the digest is not base64 of one")
    return algorithm, digest


def new_hash(algorithm: str) -> Any:
    return CHECKSUMS[algorithm]()


def http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


def check_content_type(request: server.Request) -> None:
    value = request.requestHeaders.getRawHeaders(b"content-type", [b""])[-1]
    if value.split(b";")[0].strip().lower() != OFFSET_TYPE:
        raise tus_error(
            415,
            "unsupported_media_type",
            "the body must be Content-Type: application/offset+octet-stream",
        )


def set_tus_headers(request: server.Request, **headers: str | int | None) -> None:
    """C{Tus-Resumable} and the given headers (underscores for dashes), None ones left out."""
    request.setHeader(b"Tus-Resumable", VERSION.encode())
    for name, value in headers.items():
        if value is not None:
            request.setHeader(name.replace("_", "-").encode(), str(value).encode("latin-1"))


def cors(request: server.Request, origins: Sequence[str]) -> bool:
    """
    Allow the request's C{Origin} if it is one of C{origins}: set the
    answer's CORS headers.  True for a preflight (C{OPTIONS} with
    C{Access-Control-Request-Method}) from such an origin.
    """
    origin = header(request, "Origin")
    if not origins or origin is None or (origin not in origins and "*" not in origins):
        return False
    request.setHeader(b"Access-Control-Allow-Origin", origin.encode("latin-1"))
    request.setHeader(b"Vary", b"Origin")
    request.setHeader(b"Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS.encode())
    if request.method == b"OPTIONS" and header(request, "Access-Control-Request-Method"):
        request.setHeader(b"Access-Control-Allow-Methods", CORS_METHODS.encode())
        request.setHeader(b"Access-Control-Allow-Headers", CORS_ALLOW_HEADERS.encode())
        request.setHeader(b"Access-Control-Max-Age", b"86400")
        return True
    return False

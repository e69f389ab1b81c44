"""
What an upload request says besides its files: its query and form fields
(the profile, its parameters, the control fields) and the digests it gives
for its body, in headers or fields.  Each problem is an L{APIError} raised
before anything is written, or once the fields of a form body are all in.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from twisted.web import server

from transcoder.core.profiles import RESERVED_FIELDS, Profile
from transcoder.http.errors import APIError
from transcoder.http.webhooks import callback_url_problem

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def query_arg(args: Mapping[bytes, list[bytes]], name: str) -> str | None:
    """Query parameter C{name}, or None; 400 if given twice with different values, or not UTF-8."""
    values = args.get(name.encode("utf-8"))
    if not values:
        return None
    if any(v != values[0] for v in values):
        raise APIError(
            400, "conflicting_fields", f"query parameter {name[:64]!r} is given different values"
        )
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "bad_query", f"query parameter {name[:64]!r} is not UTF-8") from None


def query_fields(args: Mapping[bytes, list[bytes]]) -> dict[str, str]:
    """Every query parameter, each checked as by L{query_arg}."""
    out: dict[str, str] = {}
    for key in args:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "bad_query", "query parameter names must be UTF-8") from None
        value = query_arg(args, name)
        if value is not None:
            out[name] = value
    return out


def split_fields(fields: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Control fields (profile, filename, ...) and the rest, which are profile parameters."""
    control = {k: v for k, v in fields.items() if k in RESERVED_FIELDS or k.startswith("sha256.")}
    params = {k: v for k, v in fields.items() if k not in control}
    return control, params


def check_callback(url: str | None) -> str | None:
    """The C{callback_url} field, None if empty; 422 if it is no URL a webhook may go to."""
    if url is None or url == "":
        return None
    problem = callback_url_problem(url)
    if problem is not None:
        raise APIError(422, "invalid_callback_url", f"callback_url {problem}")
    return url


def input_digests(control: Mapping[str, str], profile: Profile) -> dict[str, str]:
    """
    The SHA-256 digests the client gave for the profile's inputs, by role:
    C{sha256.<role>}, or plain C{sha256} where there is one input.  A digest
    for an input the profile does not have is refused rather than ignored: the
    client meant something to be checked.
    """
    out: dict[str, str] = {}
    for name, value in control.items():
        if name == "sha256":
            if len(profile.inputs) != 1:
                raise APIError(
                    400,
                    "bad_digest",
                    f"profile {profile.name} takes several inputs: name each digest "
                    f"sha256.<input> ({', '.join(profile.inputs)})",
                )
            role = profile.inputs[0]
        elif name.startswith("sha256."):
            role = name[len("sha256.") :]
            if role not in profile.inputs:
                raise APIError(
                    400,
                    "bad_digest",
                    f"{name[:64]!r} names no input of profile {profile.name} "
                    f"({', '.join(profile.inputs)})",
                )
        else:
            continue
        if not _HEX64.match(value):
            raise APIError(400, "bad_digest", f"{name[:64]} must be 64 hexadecimal digits")
        if out.get(role, value.lower()) != value.lower():
            raise APIError(400, "conflicting_fields", f"two different digests for input {role!r}")
        out[role] = value.lower()
    return out


def _base64_digest(encoded: bytes, size: int, malformed: str) -> str:
    """The hex of a base64 digest of C{size} bytes; else 400 bad_digest saying C{malformed}."""
    try:
        digest = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != size:
        raise APIError(400, "bad_digest", malformed)
    return digest.hex()


def body_sha256(request: server.Request) -> str | None:
    """The SHA-256 of the whole body that C{Repr-Digest} or C{Content-Digest} gives, if any."""
    found: str | None = None
    for header in (b"repr-digest", b"content-digest"):
        for value in request.requestHeaders.getRawHeaders(header, []):
            m = re.search(rb"sha-256=:([A-Za-z0-9+/=]+):", value)
            if m is None:
                continue
            digest = _base64_digest(m.group(1), 32, f"{header.decode()} sha-256 is malformed")
            if found is not None and found != digest:
                raise APIError(400, "conflicting_fields", "Repr-Digest and Content-Digest differ")
            found = digest
    return found


def content_md5(request: server.Request) -> str | None:
    """The hex of the C{Content-MD5} header's digest, if any."""
    value = request.requestHeaders.getRawHeaders(b"content-md5", [None])[0]
    if value is None:
        return None
    return _base64_digest(value.strip(), 16, "Content-MD5 must be the base64 of 16 bytes")

"""
The service's own URL, for the absolute URLs of webhook bodies (C{url},
C{result_url}, each output's C{url}): C{--public-url} when given, else what an
upload's C{Host} header said, kept with its job.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address

from transcoder.core.submit import BASE_URL_KEY

# RFC 3986's reg-name (letters, digits, dots, dashes: what a DNS name or an IPv4
# address holds) or an IPv6 literal, then an optional port.
_HOST = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]{0,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
__all__ = ["BASE_URL_KEY", "normal_public_url", "public_url_problem", "request_base_url"]


def public_url_problem(url: str) -> str | None:
    """Why C{url} cannot be C{--public-url}, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "must have no query or fragment"
    if "@" in parts.netloc:
        return "must have no user name or password"
    if not _HOST.fullmatch(parts.netloc):
        return "must name a host (a DNS name, an IPv4 address or an IPv6 one in brackets)"
    return None


def normal_public_url(url: str) -> str:
    """C{url} without its trailing slashes: the job's paths (C{/jobs/...}) follow it."""
    return url.rstrip("/")


def request_base_url(request: Any) -> str | None:
    """
    C{http(s)://<Host>} of a request: its C{Host} header when that is a host
    and port, else the address it came in on; None for a Unix socket.
    """
    scheme = "https" if request.isSecure() else "http"
    raw = request.getHeader(b"host")
    host = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if host is not None and _HOST.fullmatch(host):
        return f"{scheme}://{host.lower()}"
    local = request.getHost()
    if isinstance(local, IPv4Address):
        return f"{scheme}://{local.host}:{local.port}"
    if isinstance(local, IPv6Address):
        return f"{scheme}://[{local.host}]:{local.port}"
    return None

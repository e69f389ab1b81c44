"""
Which certificates an C{https://} server may present: the system's trusted
authorities (Twisted's default), those of a PEM file (C{--cacert}, e.g. the
self-signed certificate of a test server), or none checked (C{--insecure}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


def tls_policy(cacert: Path | str | None = None, verify: bool = True) -> IPolicyForHTTPS:
    """The policy for an L{Agent}: see the module's docstring."""
    if not verify:
        return Unverified()
    if cacert is None:
        return BrowserLikePolicyForHTTPS()
    # Read now, so that a missing or malformed file fails before any request.
    try:
        pem = Path(cacert).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the CA certificate {cacert}: {e.strerror}") from None
    try:
        authority = ssl.Certificate.loadPEM(pem)
    except (SSL.Error, crypto.Error):
        raise ValueError(f"{cacert} holds no PEM certificate") from None
    return BrowserLikePolicyForHTTPS(trustRoot=authority)


@implementer(IPolicyForHTTPS)
class Unverified:
    """TLS that accepts any certificate for any name: encryption without authentication."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return _UnverifiedCreator(hostname.decode("ascii", "replace"))


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._hostname and not self._hostname[0].isdigit() and ":" not in self._hostname:
            # SNI, for a server (or proxy) with several names on one address.
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection

"""
Every private name of Twisted that transcoder relies on, and nothing else.

twisted.web gives no public way to route a request before its body arrives,
to hand a socket to a pump mid-body, or to answer a malformed request in JSON;
what the server and the client need for that is wrapped here in small
functions, so that the rest of the package uses none of Twisted's private
names and a Twisted upgrade that drops one breaks this module only.
L{PRIVATE} lists them: tests/test_twisted_private.py checks each against the
installed Twisted, and that no other module uses them directly.

Both the server (L{transcoder.http}) and the client use this module, so it
imports nothing of either, and loads Twisted's HTTP client only when
L{RequestNotSent} is asked for: C{serve} never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.web.http import (
    HTTPChannel,
    _ChunkedTransferDecoder,
    _GenericHTTPChannelProtocol,
    _IdentityTransferDecoder,
)

if TYPE_CHECKING:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.web._newclient import RequestNotSent as RequestNotSent
    from twisted.web.http import Request


@dataclass(frozen=True)
class Private:
    """
    A private name: C{owner} (a module or a class, dotted) has C{name}, on
    the class itself or, if C{instance}, only on its instances.
    """

    owner: str
    name: str
    instance: bool = False


PRIVATE = (
    Private("twisted.web.http", "_ChunkedTransferDecoder"),
    Private("twisted.web.http", "_IdentityTransferDecoder"),
    Private("twisted.web.http", "_GenericHTTPChannelProtocol"),
    Private("twisted.web._newclient", "RequestNotSent"),
    Private("twisted.web.http.HTTPChannel", "_maybeChooseTransferDecoder"),
    Private("twisted.web.http.HTTPChannel", "_respondToBadRequestAndDisconnect"),
    Private("twisted.web.http.HTTPChannel", "_command", instance=True),
    Private("twisted.web.http.HTTPChannel", "_path", instance=True),
    Private("twisted.web.http.HTTPChannel", "_version", instance=True),
    Private("twisted.web.http.HTTPChannel", "_transferDecoder", instance=True),
    Private("twisted.web.http.Request", "_disconnected"),
    Private("twisted.web.http._ChunkedTransferDecoder", "state"),
    Private("twisted.web.http._ChunkedTransferDecoder", "length", instance=True),
    Private("twisted.web.http._ChunkedTransferDecoder", "_buffer", instance=True),
    Private("twisted.web.http._ChunkedTransferDecoder", "_start", instance=True),
    Private("twisted.web.http._IdentityTransferDecoder", "contentLength", instance=True),
    Private("twisted.application.internet.StreamServerEndpointService", "_raiseSynchronously"),
)


def __getattr__(name: str) -> Any:
    # twisted.web._newclient is the HTTP client: loaded for the client only.
    if name == "RequestNotSent":
        from twisted.web._newclient import RequestNotSent

        return RequestNotSent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The server's side: the channel and its request.


def request_line(channel: HTTPChannel) -> tuple[bytes, bytes, bytes]:
    """
    The method, URI and version of the request whose head C{channel} is
    reading: in C{gotLength}, the request has none of them yet.
    """
    return channel._command, channel._path, channel._version


def past_request_line(channel: HTTPChannel) -> bool:
    """
    Whether C{channel} has read the request line of the request it is
    reading (it keeps the line's parts until the body is in).
    """
    return hasattr(channel, "_command")


def disconnected(request: Request) -> bool:
    """Whether C{request}'s connection is gone."""
    return bool(getattr(request, "_disconnected", False))


def channel_protocol(channel: HTTPChannel) -> Any:
    """C{channel} as C{Site.protocol} returns it: in the wrapper that can switch it to HTTP/2."""
    return _GenericHTTPChannelProtocol(channel)


class HookedHTTPChannel(HTTPChannel):
    """An HTTPChannel with public methods where two private ones decide things."""

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        return bool(super()._maybeChooseTransferDecoder(header, self.framing_header(header, data)))

    def framing_header(self, header: bytes, data: bytes) -> bytes:
        """
        The value of a C{Content-Length} or C{Transfer-Encoding} header that
        the channel frames the body by: the one sent, unless overridden.
        """
        return data

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def bad_request(self) -> None:
        """The channel found the request malformed: answer, disconnect (by default a bare 400)."""
        super()._respondToBadRequestAndDisconnect()


# The decoder that frames a request's body, for a pump that reads part of it
# past the channel.


@dataclass(frozen=True)
class ChunkedPosition:
    """Where a chunked body's decoder stands between two reads."""

    state: str
    """C{CHUNK_LENGTH}, C{BODY}, C{CRLF}, C{TRAILER} or C{FINISHED}."""
    left: int
    """In C{BODY}, the bytes of the current chunk still to come; else 0."""
    idle: bool
    """Whether the decoder holds no bytes it has yet to parse."""


def chunked_position(channel: HTTPChannel | None) -> ChunkedPosition | None:
    """Where C{channel}'s chunked decoder stands; None if the body it reads is not chunked."""
    decoder = getattr(channel, "_transferDecoder", None)
    if not isinstance(decoder, _ChunkedTransferDecoder):
        return None
    state = decoder.state
    return ChunkedPosition(
        state=state,
        left=decoder.length if state == "BODY" else 0,
        # A Twisted whose decoder keeps no _buffer is never taken as idle.
        idle=not getattr(decoder, "_buffer", b"unknown"),
    )


def resume_chunked_at_size_line(channel: HTTPChannel) -> None:
    """The next bytes C{channel} is given start a chunk's size line."""
    decoder = channel._transferDecoder
    assert isinstance(decoder, _ChunkedTransferDecoder)
    decoder.state = "CHUNK_LENGTH"
    decoder._start = 0


def take_rest_as_chunk_data(channel: HTTPChannel) -> None:
    """Whatever C{channel} is given from here on is one endless chunk's data, never framing."""
    decoder = channel._transferDecoder
    assert isinstance(decoder, _ChunkedTransferDecoder)
    decoder.state = "BODY"
    decoder.length = 1 << 62


def skip_body_bytes(channel: HTTPChannel, nbytes: int) -> None:
    """C{nbytes} of a body of known length were read past C{channel}: it expects that many fewer."""
    decoder = channel._transferDecoder
    if isinstance(decoder, _IdentityTransferDecoder) and decoder.contentLength:
        decoder.contentLength -= nbytes


# The service.


def raise_listen_errors(service: StreamServerEndpointService) -> None:
    """Make C{service}'s C{startService} raise when it cannot listen, instead of only logging it."""
    service._raiseSynchronously = True

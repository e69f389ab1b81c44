"""A raw HTTP client for tests: bytes in exactly as given, everything back until the server closes."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class Raw(Protocol):
    """Sends bytes as given and keeps what comes back, for what clients' libraries hide."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(self.data)


async def connect_raw(port: int, request: bytes) -> Raw:
    proto = Raw(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return proto


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status.split()[1]), headers, body

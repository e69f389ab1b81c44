"""
The L{Site} that streams request bodies (L{TranscoderRequest}) and answers
every request in JSON, down to a malformed one; and its draining on shutdown.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from transcoder._twisted import HookedHTTPChannel, channel_protocol, past_request_line
from transcoder.core.errors import DomainError
from transcoder.http.errors import APIError
from transcoder.http.request import TranscoderRequest
from transcoder.http.responses import capped_int, raw_response

log = Logger()


class _Channel(HookedHTTPChannel):
    """
    An HTTP channel whose every answer is JSON, down to a malformed request's,
    and that gives a request's head one idle timeout to arrive in full:
    HTTPChannel resets its idle timer on every byte, so without that a client
    sending its headers a byte at a time would hold the connection forever.
    """

    _head_deadline: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._head_deadline is None and self.line_mode and self.timeOut:
            self._head_deadline = self.callLater(self.timeOut, self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_head_deadline()
        super().connectionLost(reason)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        self._answer_and_close(APIError(408, "request_timeout", "the request head came too slowly"))

    def timeoutConnection(self) -> None:
        request = self.requests[-1] if self.requests else None
        if isinstance(request, TranscoderRequest) and request.body_timed_out():
            return
        super().timeoutConnection()

    def _answer_and_close(self, error: DomainError) -> None:
        transport: Any = self.transport
        transport.write(raw_response(error))
        self.loseConnection()

    def framing_header(self, header: bytes, data: bytes) -> bytes:
        # HTTPChannel int()s the length, and Python refuses more than 4300
        # digits: an unhandled error and no answer.  A length that long is past
        # any limit, so it is read as the largest (the request refuses it).
        if header == b"Content-Length" and data.isdigit():
            data = b"%d" % capped_int(data.decode("ascii"))
        return data

    def bad_request(self) -> None:
        self._answer_and_close(APIError(400, "bad_request", "malformed HTTP request"))

    def lineLengthExceeded(self, line: bytes) -> None:
        # Past the request line (its parts are kept until the body is in), a header is too long.
        if past_request_line(self):
            error = APIError(431, "header_too_large", "a request header line is too long")
        else:
            error = APIError(414, "uri_too_long", "the request line is too long")
        self._answer_and_close(error)


def _channel_factory(factory: Any) -> Any:
    # As http._genericHTTPChannelProtocolFactory, with the channel above.
    return channel_protocol(_Channel())


class TranscoderSite(server.Site):
    """
    A Site whose requests stream their bodies (L{TranscoderRequest}) and whose
    every answer, down to a malformed request's, is JSON.
    """

    protocol = _channel_factory  # type: ignore[assignment]

    def __init__(
        self, resource: Resource, reactor: IReactorTime, idle_timeout: float | None
    ) -> None:
        super().__init__(
            resource,
            requestFactory=TranscoderRequest,
            reactor=reactor,
            timeout=idle_timeout,
            parsePOSTFormSubmission=False,
        )
        self.displayTracebacks = False
        # Requests whose upload body was accepted and that have not answered yet.
        self.uploads: set[server.Request] = set()
        # Set on shutdown: new uploads get 503 while the accepted ones finish.
        self.stopping = False

    def drain(self, grace: float) -> Deferred[int]:
        """
        Stop taking uploads, wait up to C{grace} seconds for those under way to
        finish, then cut off the rest (their partial files are removed as for
        any client that goes away).  Fires with the number cut off.
        """
        self.stopping = True
        clock: Any = self.reactor
        done: Deferred[int] = Deferred()
        deadline = clock.seconds() + grace

        def check() -> None:
            if not self.uploads:
                done.callback(0)
            elif clock.seconds() >= deadline:
                left = list(self.uploads)
                log.warn("shutting down: cutting off {n} unfinished uploads", n=len(left))
                for request in left:
                    transport: Any = request.channel.transport if request.channel else None
                    if transport is not None:
                        transport.abortConnection()
                done.callback(len(left))
            else:
                clock.callLater(min(0.1, max(0.0, deadline - clock.seconds())), check)

        if self.uploads:
            log.info(
                "shutting down: waiting up to {grace}s for {n} uploads",
                grace=grace,
                n=len(self.uploads),
            )
        check()
        return done

"""
The request that decides, before its body is read, where the body goes.

Stock twisted.web spools every body to a temporary file, reaches the resource
only once all of it is in, and then parses form bodies into memory.  Here
L{TranscoderRequest} decides in C{gotLength}, after the headers and before any
body byte or C{100 Continue}, what the body is for:

  - the addressed resource provides L{IBodyReceiver}: it checks the request
    (profile, size, capacity) and returns an L{IRequestBody}, which gets every
    chunk as the transfer decoder produces it;
  - the resource refuses: the error goes out at once, without C{100 Continue};
  - any other resource: small bodies only, kept by the stock machinery.

A big body that has the server to itself is read by a L{SocketPump} off the
reactor, and handed back to the channel for its last bytes.  Every body must
keep coming: an idle or trickling one is cut off with 408.  The bodies
themselves are in L{transcoder.http.bodies} and L{transcoder.http.formdata}.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import parse_qs
from twisted.web.resource import IResource

from transcoder._twisted import (
    chunked_position,
    disconnected,
    request_line,
    resume_chunked_at_size_line,
    skip_body_bytes,
    take_rest_as_chunk_data,
)
from transcoder.core.errors import DomainError
from transcoder.http.bodies import IBodyReceiver, IRequestBody, RawBody
from transcoder.http.chunked import Chunked
from transcoder.http.errors import APIError, http_error, method_not_allowed
from transcoder.http.formdata import MultipartBody
from transcoder.http.pump import FileStart, Hashes, PumpEnd, SocketPump
from transcoder.http.responses import ErrorResource, allowed_methods, raw_response
from transcoder.http.tusbody import TusPatchBody

log = Logger()

# Endpoints that do not stream take small bodies or none.
SMALL_BODY = 64 * 1024
# How long a refused request's body is read and thrown away before closing, so
# that the client sees the answer rather than a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 << 20
# Reading 1 MiB per recv instead of 64 KiB cut the upload path's CPU by a
# quarter (measured; see docs/performance.md).
UPLOAD_READ_SIZE = 1 << 20
# A body must bring at least this much per idle-timeout window (64 KiB a
# minute with the default timeout: about 1 KiB/s).
MIN_BYTES_PER_WINDOW = 64 * 1024
# Raw bodies of a known length above this are read by a SocketPump, all but
# their last PUMP_TAIL bytes, which come through the HTTP channel as usual.
PUMP_MIN = 4 << 20
PUMP_TAIL = 64 * 1024
# A chunked body is taken over by a pump once this much of it has come
# through the reactor: sooner, fewer of the spool's staging buffers are ever
# touched (peak RSS +14 MiB at 4 MiB).
CHUNKED_PUMP_AT = 1 << 20
# Pumps at once, each with its buffers (6 MiB).  A pump is for an upload that
# has the server to itself: beside other uploads it went no faster in all,
# and the load test's status polls waited longer (p99 149 ms with no pump,
# 176 with one, 283 with four; measured), so an upload that arrives while
# another is in flight is read by the reactor, which also bounds memory
# however many arrive together.
MAX_PUMPS = 1


def _stalled(timeout: float | None) -> APIError:
    return APIError(408, "too_slow", f"no byte of the body came in {timeout or 0:g} s")


def _ready_tus(body: IRequestBody) -> bool:
    """A tus PATCH's body that writes as it comes (not one waiting for its upload)."""
    return isinstance(body, TusPatchBody) and body.ready


# Requests whose body a SocketPump reads (or is about to); reactor thread only.
_pumping: set[TranscoderRequest] = set()


class TranscoderRequest(server.Request):
    """
    A request whose body goes where its resource says, decided before the
    body is read.  See the module docstring.
    """

    body: IRequestBody | None = None
    _refused = False
    _received = 0
    _receivedAtCheck = 0
    _paused = False
    _pausedInWindow = False
    _rateCall: Any = None
    _linger: Any = None
    _lingerLeft = 0
    # Set from gotLength until a SocketPump has handed the socket back.
    _pumping = False
    _pump: SocketPump | None = None
    _timeOut: float | None = None
    # For a chunked raw body: how much data to take through the reactor
    # before a pump may take over, or None for no pump.
    _chunkedPumpAt: int | None = None

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        method, uri, version = request_line(channel)
        if length == 0 and method not in (b"POST", b"PUT"):
            super().gotLength(length)
            return
        site: Any = channel.site
        try:
            if getattr(site, "stopping", False) and method in (b"POST", b"PUT"):
                raise APIError(
                    503, "shutting_down", "the server is shutting down", {"Retry-After": "30"}
                )
            resource = self._route(method, uri, version)
            if isinstance(resource, ErrorResource):
                raise resource.error
            # A method the resource does not take is refused before anything
            # about its body: that is the first thing wrong with the request.
            allowed = allowed_methods(resource)
            name = method.decode("ascii", "replace")
            if allowed and name not in allowed:
                raise method_not_allowed(name, allowed)
            receiver = IBodyReceiver(resource, None)
            if receiver is None:
                if length is None or length > SMALL_BODY:
                    raise APIError(413, "too_large", "this endpoint takes no large body")
                super().gotLength(length)
                return
            body = receiver.receive_body(self, length)
        except DomainError as e:
            self.content = io.BytesIO()
            self._refuse(e, body_started=False)
            return
        except Exception:
            log.failure("refusing a request: routing it failed")
            self.content = io.BytesIO()
            self._refuse(APIError(500, "internal", "internal server error"), body_started=False)
            return
        self.content = io.BytesIO()
        self.body = body
        uploads = getattr(site, "uploads", None)
        alone = not uploads
        if uploads is not None:
            # The site waits for these on shutdown.
            uploads.add(self)
            self.notifyFinish().addBoth(lambda _: uploads.discard(self))
        body_any: Any = body
        body_any.onFatal = self._fail_mid_body
        body_any.onPressure = self._pressure
        transport: Any = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = UPLOAD_READ_SIZE
        if (
            (isinstance(body, RawBody | MultipartBody) or _ready_tus(body))
            and length is not None
            and length - PUMP_TAIL >= PUMP_MIN
            and isinstance(transport, tcp.Connection)
            and len(_pumping) < MAX_PUMPS
            and alone
        ):
            # Reading stops now; the rest of the bytes already read still
            # reach handleContentChunk before the pump starts.
            self._pumping = True
            _pumping.add(self)
            transport.stopReading()
            channel.callLater(0, self._start_pump, body, length)
        elif (
            isinstance(body, RawBody)
            and length is None
            and isinstance(transport, tcp.Connection)
            and alone
        ):
            # Chunked: its size is unknown, so a pump only takes a body that
            # has shown itself big (see handleContentChunk).
            self._chunkedPumpAt = CHUNKED_PUMP_AT
        self._watch_rate(channel)

    def _start_pump(self, body: RawBody | MultipartBody | TusPatchBody, length: int) -> None:
        left = length - self._received - PUMP_TAIL
        if self.body is not body or self.channel is None or disconnected(self) or left < PUMP_MIN:
            # Refused already, gone, or the first reads brought most of the
            # body: the reactor reads the rest (or lingers), as without a pump.
            self._no_pump()
            return
        self._run_pump(
            body,
            left,
            file_start=body.file_start if isinstance(body, MultipartBody | TusPatchBody) else None,
            hashes=body.hashes if isinstance(body, RawBody | TusPatchBody) else None,
        )

    def _run_pump(
        self,
        body: RawBody | MultipartBody | TusPatchBody,
        length: int,
        file_start: FileStart | None = None,
        hashes: Hashes | None = None,
        chunked: Chunked | None = None,
    ) -> None:
        """Start a L{SocketPump} reading C{length} bytes (0: a chunked body) into C{body}."""
        channel: Any = self.channel
        transport: Any = self.transport
        # The pump watches for an idle client itself; the channel's timer would
        # only see that the reactor stopped reading.
        self._timeOut = channel.setTimeout(None)
        self._pump = SocketPump(
            body.reactor,
            transport.socket,
            length,
            body.lend,
            self._timeOut,
            offset=self._received,
            file_start=file_start,
            hashes=hashes,
            chunked=chunked,
        )
        self._pump.start().addCallback(self._pump_ended)

    def _no_pump(self) -> None:
        """A pump was readied but is not started: the reactor reads again."""
        self._pumping = False
        _pumping.discard(self)
        if self.channel is not None and not disconnected(self) and not self._paused:
            transport: Any = self.transport
            transport.resumeProducing()

    def _maybe_pump_chunks(self) -> None:
        """
        From handleContentChunk, within the transfer decoder's parsing: once
        a chunked body has brought enough, stop reading, so that by the next
        reactor turn the decoder has parsed all it was given, and see then
        whether a pump can take over where it stands.
        """
        at = self._chunkedPumpAt
        if at is None or self._received < at or self._pumping or self._paused:
            return
        channel: Any = self.channel
        site: Any = getattr(channel, "site", None)
        # Asked once: from here on, a pump or the reactor reads the rest.
        self._chunkedPumpAt = None
        if len(_pumping) >= MAX_PUMPS or getattr(site, "uploads", None) != {self}:
            # Not alone (any more): the reactor reads, as for any upload beside others.
            return
        self._pumping = True
        _pumping.add(self)
        transport: Any = self.transport
        transport.stopReading()
        channel.callLater(0, self._start_chunked_pump)

    def _start_chunked_pump(self) -> None:
        channel: Any = self.channel
        body = self.body
        at = chunked_position(channel)
        if (
            not isinstance(body, RawBody)
            or channel is None
            or disconnected(self)
            or at is None
            # Taken over only between its reads, with nothing half-parsed:
            # otherwise a few more reads through the reactor, and again.
            or not at.idle
            or at.state not in ("BODY", "CRLF", "CHUNK_LENGTH")
        ):
            if isinstance(body, RawBody) and at is not None:
                if at.state != "TRAILER" and at.state != "FINISHED":
                    self._chunkedPumpAt = self._received + UPLOAD_READ_SIZE
            self._no_pump()
            return
        self._run_pump(
            body,
            0,
            chunked=Chunked(
                left=at.left,
                crlf=at.state in ("BODY", "CRLF"),
                limit=body.room(),
            ),
        )

    def _pump_ended(self, end: PumpEnd) -> None:
        """On the reactor: count the pumped bytes where the channel counts them; read again."""
        self._pump = None
        self._pumping = False
        _pumping.discard(self)
        self._received += end.lent
        if isinstance(self.body, RawBody | MultipartBody | TusPatchBody):
            self.body.lent(end.lent)
        channel: Any = self.channel
        if channel is None or disconnected(self):
            return
        if chunked_position(channel) is not None:
            if end.reason == "complete":
                # The pump stopped at the last chunk's size line, of which it
                # may have read the start: that is where the decoder goes on,
                # as the channel gives it the bytes.
                resume_chunked_at_size_line(channel)
                if end.leftover:
                    channel.dataReceived(end.leftover)
            else:
                # Refused (413, 400) or gone, somewhere inside the framing:
                # what still comes is taken as data, which the refused request
                # swallows while its answer lingers, instead of framing the
                # decoder would call malformed, answering and dropping the
                # connection under the client (which may then lose our answer).
                take_rest_as_chunk_data(channel)
        else:
            skip_body_bytes(channel, end.received)
        channel.setTimeout(self._timeOut)
        if end.reason == "idle":
            self._fail_mid_body(_stalled(self._timeOut))
        elif end.reason == "malformed":
            # The code the channel gives framing it refuses itself (see resources._Channel).
            self._fail_mid_body(
                APIError(400, "bad_request", f"malformed chunked body: {end.error}")
            )
        elif end.reason == "too_large" and isinstance(self.body, RawBody):
            self._fail_mid_body(self.body.too_large())
        if end.reason == "failed":
            error = end.error
            if not isinstance(error, DomainError):
                log.failure(
                    "reading an upload failed",
                    failure=Failure(error) if error is not None else None,
                )
                error = APIError(500, "internal", "internal server error")
            self._fail_mid_body(error)
        if not self._paused:
            transport: Any = self.transport
            transport.resumeProducing()

    def body_timed_out(self) -> bool:
        """
        For the channel's idle timeout: mid-body, answer 408 too_slow, as
        the body-rate check and a pump's idle end do, rather than let the
        channel close without a word (True); otherwise False.
        """
        if self.body is None or self._refused or self.channel is None:
            return False
        if self._paused:
            # The server stopped reading (its disk is behind), not the client
            # sending: wait another while.
            self.channel.setTimeout(self.channel.timeOut)
            return True
        self._fail_mid_body(_stalled(self.channel.timeOut))
        return True

    def _body_bytes(self) -> int:
        pump = self._pump
        return self._received + (pump.received if pump is not None else 0)

    def _watch_rate(self, channel: Any) -> None:
        """
        Cut off a body that trickles: the idle timeout only catches a client
        that sends nothing, so one byte a second would hold a connection and
        a staging file for days.  Each idle-timeout window must bring at
        least L{MIN_BYTES_PER_WINDOW}, unless the server itself paused reading.
        """
        window = channel.timeOut
        if not window:
            return

        def check() -> None:
            self._rateCall = None
            if self.body is None:
                return
            pump = self._pump
            if pump is not None and pump.stalled:
                pump.stalled = False
                self._pausedInWindow = True
            received = self._body_bytes()
            if received - self._receivedAtCheck < MIN_BYTES_PER_WINDOW and not (
                self._pausedInWindow
            ):
                self._fail_mid_body(
                    APIError(
                        408,
                        "too_slow",
                        f"the body came slower than {MIN_BYTES_PER_WINDOW} bytes in {window:g} s",
                    )
                )
                return
            self._receivedAtCheck = received
            self._pausedInWindow = self._paused
            self._rateCall = channel.callLater(window, check)

        self._rateCall = channel.callLater(window, check)

    def _stop_watching_rate(self) -> None:
        if self._rateCall is not None and self._rateCall.active():
            self._rateCall.cancel()
        self._rateCall = None

    def _route(self, method: bytes, uri: bytes, version: bytes) -> IResource:
        """Find the resource early; L{process} finds it again the usual way later."""
        self.method, self.uri, self.clientproto = method, uri, version
        path, _, query = uri.partition(b"?")
        self.path = path
        self.args = parse_qs(query, 1) if query else {}
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in path[1:].split(b"/")]
        channel: Any = self.channel
        resource: IResource = channel.site.getResourceFor(self)
        return resource

    def handleContentChunk(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            self._received += len(data)
            try:
                body.dataReceived(data)
            except DomainError as e:
                self._fail_mid_body(e)
                return
            if self._chunkedPumpAt is not None:
                self._maybe_pump_chunks()
            return
        if self._refused:
            self._lingerLeft -= len(data)
            if self._lingerLeft < 0:
                self._close()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stop_watching_rate()
        if self._refused:
            self._close()
            return
        transport: Any = self.transport
        if self.body is not None and hasattr(transport, "bufferSize"):
            try:
                del transport.bufferSize
            except AttributeError:
                pass
        super().requestReceived(command, path, version)

    def _pressure(self, paused: bool) -> None:
        self._paused = paused
        if paused:
            self._pausedInWindow = True
        if self.channel is None or disconnected(self) or self._pumping:
            # A pump reading the socket lends buffers and waits for them to come
            # back: it needs no pausing, and the reactor must not read meanwhile.
            return
        transport: Any = self.transport
        if paused:
            transport.pauseProducing()
        else:
            transport.resumeProducing()
            # The client gets a whole idle window from here, not what the
            # pause left of one.
            self.channel.resetTimeout()

    def _fail_mid_body(self, error: DomainError) -> None:
        self._stop_watching_rate()
        if self._pump is not None:
            # The answer goes out now; reading resumes (to linger) once the pump is off the socket.
            self._pump.stop()
        body, self.body = self.body, None
        if body is not None:
            body.abort()
        outcome = getattr(self, "upload_outcome", None)
        if outcome is not None:
            outcome.error(error)
        if not self._refused and self.channel is not None:
            self._pressure(False)
            self._refuse(error, body_started=True)

    def _refuse(self, error: DomainError, body_started: bool) -> None:
        """
        Answer now, with the body unread.  A client that asked for C{100
        Continue} has sent nothing yet, so the connection can close at once;
        others may be sending, and closing on unread data would reset the
        connection before they read the answer, so their bytes are read and
        dropped for a short while first.
        """
        self._refused = True
        channel: Any = self.channel
        uploads = getattr(channel.site, "uploads", None)
        if uploads is not None:
            # No job will come of it: it no longer counts against the queue,
            # and shutdown need not wait for its linger.
            uploads.discard(self)
        expect = self.requestHeaders.getRawHeaders(b"expect", [b""])[0].lower()
        # HTTPChannel sends 100 Continue after gotLength returns, if this is still there.
        self.requestHeaders.removeHeader(b"expect")
        channel.persistent = False
        channel.transport.write(raw_response(error, self._cors_headers()))
        log.info(
            "refused {method} {uri}: {status} {code}",
            method=self.method,
            uri=self.uri,
            status=http_error(error).status,
            code=error.code,
        )
        if expect == b"100-continue" and not body_started:
            self._close()
        else:
            self._lingerLeft = LINGER_BYTES
            self._linger = channel.callLater(LINGER_SECONDS, self._close)

    def _cors_headers(self) -> list[tuple[str, str]]:
        """
        The CORS headers routing set (an allowed origin only: see
        L{transcoder.http.tusproto.cors}), so that a page on that origin can
        read a refusal sent before the body too.
        """
        found = []
        for name, values in self.responseHeaders.getAllRawHeaders():
            text = name.decode("latin-1")
            if text.lower().startswith("access-control-") or text.lower() == "vary":
                found += [(text, v.decode("latin-1")) for v in values]
        return found

    def _close(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self.channel is not None:
            self.channel.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._stop_watching_rate()
        if self._pump is not None:
            self._pump.stop(disconnect=True)
        body, self.body = self.body, None
        if body is not None:
            body.abort()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        """Log the traceback; the client gets a JSON 500 and never the traceback."""
        log.failure("request {uri} failed", failure=reason, uri=self.uri)
        if self.finished or disconnected(self):
            return
        error = APIError(500, "internal", "internal server error")
        body = error.body()
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()

"""
A treq client of the transcoding service.

    client = Client("http://127.0.0.1:8080", token=None)
    job = await client.submit({"video": Path("video.flv"), "audio": Path("audio.mp3")}, "mux-avi")
    job = await client.wait(job.id)
    await client.download(job.id, Path("out.avi"))

Every method returns a L{Deferred} (C{await} it under C{ensureDeferred}).
Uploads stream from disk and downloads stream to disk, so memory stays flat
whatever the file sizes.  Any error answer of the server raises
L{TranscoderError}; network failures raise Twisted's own exceptions:
L{twisted.internet.error.ConnectError} (cannot connect),
L{twisted.web.client.ResponseFailed} (the connection broke, whether while the
request was being sent or while the answer came) and
L{twisted.internet.defer.TimeoutError} (no answer, or no progress, in time).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import Cooperator, deferLater
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from transcoder._twisted import RequestNotSent
from transcoder.client.bodies import FilePart, ProgressCallback, StreamingBody
from transcoder.client.errors import TranscoderError, error_from, network_failure
from transcoder.client.jobs import JobCallback, RemoteJob
from transcoder.client.outputs import save_outputs
from transcoder.client.retry import Streak, Watchdog, retryable
from transcoder.client.sink import Sink

__all__ = ["Client", "ProgressCallback", "RemoteJob", "TranscoderError"]

# The server answers a long-poll after at most 60 s.
LONG_POLL = 30.0
# An upload with nothing sent, or a download with nothing received, this long
# is dropped (and a download resumed).
IDLE_TIMEOUT = 120.0
# The time for a whole answer (a long-poll: plus its wait); for an upload,
# from its last byte; for a download, until the answer's headers.
REQUEST_TIMEOUT = 60.0

# How long download and wait go on retrying a server that cannot be reached,
# drops the connection or is shutting down (a restart), from the first
# failure in a row; the pause between tries grows from 0.25 s to 5 s.
RETRY_FOR = 60.0

_T = TypeVar("_T")


class Client:
    """
    The service at C{base_url} (e.g. C{http://127.0.0.1:8080}), with a bearer
    C{token} if it requires one.  C{http} is a treq L{HTTPClient} to use
    instead of the client's own (tests pass a C{StubTreq}).

    C{request_timeout} and C{idle_timeout} bound silences (see the module's
    constants); C{retry_for} is how long L{wait} and L{download} go on
    retrying a server that is being restarted.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        reactor: Any = None,
        http: Any = None,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        retry_for: float = RETRY_FOR,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._base = base_url.rstrip("/")
        self._token = token
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._retry_for = retry_for
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            from treq.client import HTTPClient

            self._pool = HTTPConnectionPool(reactor, persistent=True)
            http = HTTPClient(Agent(reactor, pool=self._pool, connectTimeout=30))
        self._http = http
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))

    def close(self) -> Deferred[None]:
        """Close idle kept-alive connections."""
        self._cooperator.stop()
        if self._pool is not None:
            d: Deferred[None] = self._pool.closeCachedConnections()
            return d
        return Deferred.fromCoroutine(_nothing())

    # Requests.

    def _url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = self._base + path
        if query:
            url += "?" + urlencode({k: str(v) for k, v in query.items() if v is not None})
        return url

    def _headers(self, extra: Mapping[bytes, bytes] | None = None) -> dict[bytes, list[bytes]]:
        headers: dict[bytes, list[bytes]] = {b"Accept": [b"application/json"]}
        if self._token:
            headers[b"Authorization"] = [b"Bearer " + self._token.encode("utf-8")]
        for name, value in (extra or {}).items():
            headers[name] = [value]
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[bytes, bytes] | None = None,
        body: Any = None,
        unbuffered: bool = False,
    ) -> IResponse:
        try:
            response: IResponse = await self._http.request(
                method,
                self._url(path, query),
                headers=self._headers(headers),
                data=body,
                allow_redirects=False,
                unbuffered=unbuffered,
                reactor=self._reactor,
            )
        except (
            RequestGenerationFailed,
            RequestTransmissionFailed,
            RequestNotSent,
            ResponseFailed,
            ConnectingCancelledError,
        ) as e:
            translated = network_failure(e)
            if translated is e:
                raise
            raise translated from e
        if response.code >= 400:
            raise await error_from(response)
        return response

    def _limit(self, d: Deferred[_T], seconds: float, what: str) -> Deferred[_T]:
        """C{d}, cancelled and failed with L{TimeoutError} if it takes over C{seconds}."""

        def timed_out(result: Any, timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                raise TimeoutError(f"no answer to {what} within {timeout:g} s")
            return result

        return d.addTimeout(seconds, self._reactor, onTimeoutCancel=timed_out)

    async def _json(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Any:
        if timeout is None:
            timeout = self._request_timeout
        # The whole exchange, answer body included: a server that sends the
        # headers and then nothing must not hold a poll forever.
        return await self._limit(
            Deferred.fromCoroutine(self._json_now(method, path, query, **kw)),
            timeout,
            f"{method} {path}",
        )

    async def _json_now(
        self, method: str, path: str, query: Mapping[str, Any] | None = None, **kw: Any
    ) -> Any:
        response = await self._request(method, path, query, **kw)
        text = await _content(response)
        try:
            return json.loads(text)
        except ValueError:
            raise TranscoderError(
                response.code, "bad_response", f"not JSON: {text[:200]!r}"
            ) from None

    # The API.

    def submit(
        self,
        inputs: Mapping[str, Path] | Path,
        profile: str,
        params: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Deferred[RemoteJob]:
        """
        Upload C{inputs} and create a job of C{profile}.

        A single L{Path} is sent as the raw body (C{PUT /jobs?profile=...}); a
        mapping of input names to paths (C{{"video": ..., "audio": ...}} for
        C{mux-avi}) as C{multipart/form-data} with one file part per input.
        Either way the profile and C{params} travel in the query string, so
        the server can refuse them before a byte of the body is sent.

        C{on_progress(sent, total)} is called as bytes are sent.  The
        SHA-256 of each file, computed while sending, is compared with the
        digest the server stored; on a mismatch the job is cancelled and
        L{TranscoderError} (C{digest_mismatch}) raised.
        """
        return ensureDeferred(self._submit(inputs, profile, params or {}, on_progress))

    async def _submit(
        self,
        inputs: Mapping[str, Path] | Path,
        profile: str,
        params: Mapping[str, Any],
        on_progress: ProgressCallback | None,
    ) -> RemoteJob:
        query: dict[str, Any] = {"profile": profile}
        query.update(params)
        watchdog: list[Watchdog] = []
        draining: list[Any] = []

        def progress(sent: int, total: int) -> None:
            # While the body goes: idle_timeout between chunks.
            watchdog[0].feed(self._idle_timeout, "sent")
            if sent == total:
                drain(None)
            if on_progress is not None:
                on_progress(sent, total)

        def drain(before: int | None) -> None:
            # All of the body is written, but on a slow link megabytes of it
            # may still wait in the socket's buffers: the upload still moves
            # (idle_timeout) while they go, and request_timeout for the
            # answer starts once they have gone.
            draining.clear()
            unsent = body.unsent()
            if unsent is None or unsent <= 0:
                watchdog[0].feed(self._request_timeout, "answer")
                return
            if before is None or unsent < before:
                watchdog[0].feed(self._idle_timeout, "sent")
                before = unsent
            period = min(1.0, self._idle_timeout / 4)
            draining.append(self._reactor.callLater(period, drain, before))

        parts: dict[str, FilePart]
        if isinstance(inputs, (str, os.PathLike)):
            path = Path(inputs)
            body, part = StreamingBody.raw(path, self._cooperator, progress)
            query["filename"] = path.name
            parts = {"": part}
            method, ctype = "PUT", b"application/octet-stream"
        else:
            if not inputs:
                raise ValueError("no inputs")
            body, ctype, parts = StreamingBody.multipart(
                {k: Path(v) for k, v in inputs.items()}, self._cooperator, progress
            )
            method = "POST"
        # No overall limit, which would cut a long upload short: the watchdog
        # ends one that stops moving, or whose answer does not come.
        upload = Deferred.fromCoroutine(
            self._json_now(method, "/jobs", query, headers={b"Content-Type": ctype}, body=body)
        )
        watchdog.append(Watchdog(self._reactor, upload, self._idle_timeout, "sent"))
        try:
            data = await upload
        except CancelledError:
            body.stopProducing()
            expired = watchdog[0].expired
            if expired is None:
                raise
            seconds, what = expired
            if what == "sent":
                raise TimeoutError(f"the upload made no progress for {seconds:g} s") from None
            raise TimeoutError(f"no answer {seconds:g} s after the upload") from None
        except BaseException:
            # An answer that came before the whole body (a refusal) ends the upload.
            body.stopProducing()
            raise
        finally:
            watchdog[0].stop()
            for call in draining:
                if call.active():
                    call.cancel()
        job = RemoteJob.from_json(data)
        await self._check_digests(job, parts)
        return job

    async def _check_digests(self, job: RemoteJob, parts: Mapping[str, FilePart]) -> None:
        stored = {i.get("name"): i.get("sha256") for i in job.inputs}
        for name, part in parts.items():
            theirs = stored.get(name) if name else next(iter(stored.values()), None)
            if theirs is not None and part.sha256 is not None and theirs != part.sha256:
                try:
                    await self.cancel(job.id)
                except Exception:
                    pass  # The mismatch is what to report.
                raise TranscoderError(
                    0,
                    "digest_mismatch",
                    f"the server stored {part.path.name} with SHA-256 {theirs}, "
                    f"but {part.sha256} was sent; job {job.id} cancelled",
                )

    def get(self, job_id: str) -> Deferred[RemoteJob]:
        """The job's current state."""
        return ensureDeferred(self._get(job_id))

    async def _get(self, job_id: str, wait: float | None = None) -> RemoteJob:
        query = {"wait": f"{wait:g}"} if wait else None
        timeout = self._request_timeout + (wait or 0)
        data = await self._json("GET", f"/jobs/{quote(job_id, safe='')}", query, timeout=timeout)
        return RemoteJob.from_json(data)

    def wait(
        self, job_id: str, on_progress: JobCallback | None = None, poll: float = LONG_POLL
    ) -> Deferred[RemoteJob]:
        """
        Follow the job with long-polls (C{?wait=}) until it has finished;
        fire with it in its final state, whichever that is.  C{on_progress}
        gets the job each time its state or progress changes.  A poll that
        cannot connect, loses its connection or gets a 503 (a server being
        restarted) is tried again, for up to the client's C{retry_for}
        seconds from the first such failure in a row.
        """
        return ensureDeferred(self._wait(job_id, on_progress, poll))

    async def _get_again(self, job_id: str, wait: float | None = None) -> RemoteJob:
        """L{_get}, retried through a restart of the server (up to C{retry_for})."""
        streak = Streak(self._reactor, 0, self._retry_for)
        while True:
            try:
                return await self._get(job_id, wait)
            except Exception as e:
                pause = streak.failed() if retryable(e) else None
                if pause is None:
                    raise
            await deferLater(self._reactor, pause, lambda: None)

    async def _wait(self, job_id: str, on_progress: JobCallback | None, poll: float) -> RemoteJob:
        job = await self._get_again(job_id)
        if on_progress is not None:
            on_progress(job)
        while not job.finished:
            asked = self._reactor.seconds()
            latest = await self._get_again(job_id, wait=poll)
            changed = (latest.state, latest.progress) != (job.state, job.progress)
            if not changed and self._reactor.seconds() - asked < 1.0:
                # A server (or proxy) that answers a long-poll at once with
                # nothing new must not make this loop spin.
                await deferLater(self._reactor, 1.0, lambda: None)
            job = latest
            if changed and on_progress is not None:
                on_progress(job)
        return job

    def cancel(self, job_id: str) -> Deferred[None]:
        """Cancel the job (stopping its encoder) and remove it from the server."""
        return ensureDeferred(self._cancel(job_id))

    async def _cancel(self, job_id: str) -> None:
        path = f"/jobs/{quote(job_id, safe='')}"
        await self._limit(
            Deferred.fromCoroutine(self._cancel_now(path)), self._request_timeout, f"DELETE {path}"
        )

    async def _cancel_now(self, path: str) -> None:
        response = await self._request("DELETE", path)
        await _content(response)

    def jobs(self, state: str | None = None) -> Deferred[list[RemoteJob]]:
        """The server's jobs, optionally only those in C{state}."""
        return ensureDeferred(self._jobs(state))

    async def _jobs(self, state: str | None) -> list[RemoteJob]:
        data = await self._json("GET", "/jobs", {"state": state} if state else None)
        try:
            return [RemoteJob.from_json(j) for j in data["jobs"]]
        except (KeyError, TypeError):
            raise TranscoderError(0, "bad_response", "no job list in the answer") from None

    def download(
        self,
        job_id: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        retries: int = 5,
    ) -> Deferred[Path]:
        """
        Save the job's result to C{path}, streaming it to C{path}.part and
        renaming it into place once complete (and, when the job states its
        SHA-256, checked).  A dropped or stalled connection is resumed with
        C{Range} from the bytes already saved, at once if bytes came since
        the last try.  Failures in a row with nothing received (a server
        being restarted: refused connections, a 503) are retried after
        growing pauses while there have been at most C{retries} of them or
        the first is less than the client's C{retry_for} seconds old.  A
        C{.part} left by an earlier call is resumed too.
        C{on_progress(received, total)} counts bytes on disk.
        """
        return ensureDeferred(self._download(job_id, Path(path), on_progress, retries))

    def download_outputs(
        self,
        job_id: str,
        directory: Path,
        on_progress: ProgressCallback | None = None,
        retries: int = 5,
    ) -> Deferred[list[Path]]:
        """
        Save every output of the job into C{directory} under its name
        (C{360p/index.m3u8} makes C{360p/}), each as L{download} saves the
        result, checked against its SHA-256; a one-output job's result is
        saved as C{result.<ext>}.  Fires with the paths saved.
        """
        return ensureDeferred(save_outputs(self, job_id, Path(directory), on_progress, retries))

    async def _download(
        self, job_id: str, path: Path, on_progress: ProgressCallback | None, retries: int
    ) -> Path:
        job = await self._get_again(job_id)
        result = f"/jobs/{quote(job_id, safe='')}/result"
        return await self.fetch(
            result, (job.output or {}).get("sha256"), path, on_progress, retries
        )

    async def fetch(
        self,
        result: str,
        expected: str | None,
        path: Path,
        on_progress: ProgressCallback | None,
        retries: int,
    ) -> Path:
        """Save C{result} (a path on the server) to C{path}, as L{download} describes."""
        partial = path.with_name(path.name + ".part")
        digest = hashlib.sha256()
        have = 0
        if partial.exists():
            with partial.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    have += len(chunk)
        # A .part this call did not write may be of another file altogether.
        old_part = have > 0
        etag: bytes | None = None
        streak = Streak(self._reactor, retries, self._retry_for)
        while True:
            headers: dict[bytes, bytes] = {}
            if have:
                headers[b"Range"] = b"bytes=%d-" % have
                if etag is not None:
                    headers[b"If-Range"] = etag
            try:
                response = await self._limit(
                    Deferred.fromCoroutine(
                        self._request("GET", result, headers=headers, unbuffered=True)
                    ),
                    self._request_timeout,
                    f"GET {result}",
                )
            except Exception as e:
                if isinstance(e, TranscoderError) and e.status == 416 and have:
                    # Everything is here already (or the .part is not of this file:
                    # the digest check below tells).
                    break
                pause = streak.failed() if retryable(e) else None
                if pause is None:
                    raise
                await deferLater(self._reactor, pause, lambda: None)
                continue
            etag = _header(response, b"etag") or etag
            if response.code == 200:
                # A full answer: the server ignored the range, or the file changed.
                digest, have = hashlib.sha256(), 0
                mode = "wb"
                total = response.length if isinstance(response.length, int) else None
            else:
                mode = "ab"
                total = _range_total(_header(response, b"content-range"))
            received = have

            def count(n: int, total: int | None = total) -> None:
                nonlocal received
                received += n
                if on_progress is not None:
                    on_progress(received, total if total is not None else -1)

            with partial.open(mode) as out:
                sink = Sink(self._reactor, out, digest, count, self._idle_timeout)
                response.deliverBody(sink)
                try:
                    await sink.done
                    ended = True
                except (ResponseFailed, PotentialDataLoss):
                    ended = False
            made_progress = received > have
            have = received
            if ended:
                break
            if made_progress:
                # Resume at once: the connection broke, the server is there.
                streak.reset()
                continue
            pause = streak.failed()
            if pause is None:
                raise TranscoderError(
                    0, "download_failed", f"the download of {result} kept failing"
                )
            await deferLater(self._reactor, pause, lambda: None)
        if expected is not None and digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            if old_part:
                # Once more from the start, with nothing of the old .part.
                return await self.fetch(result, expected, path, on_progress, retries)
            raise TranscoderError(
                0, "digest_mismatch", f"the result's SHA-256 is not {expected}; removed the copy"
            )
        os.replace(partial, path)
        return path


async def _nothing() -> None:
    return None


def _header(response: IResponse, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def _range_total(content_range: bytes | None) -> int | None:
    """C{bytes 100-199/200} -> 200."""
    if content_range is None or b"/" not in content_range:
        return None
    total = content_range.rsplit(b"/", 1)[1].strip()
    return int(total) if total.isdigit() else None


async def _content(response: Any) -> bytes:
    content: bytes = await response.content()
    return content

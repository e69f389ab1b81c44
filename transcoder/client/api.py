"""
A treq client of the transcoding service.

    async with Client("http://127.0.0.1:8080", token=None) as client:
        job = await client.submit(Path("clip.mp4"), "mp4-h264", {"crf": 28})
        job = await client.wait(job.id)
        await client.download(job.id, Path("out.mp4"))

Every method returns a L{Deferred} (C{await} it under C{ensureDeferred}); for
a program that is not a Twisted one, L{transcoder.client.blocking.Blocking}
runs the same calls on a reactor in a thread.  Uploads stream from disk and
downloads stream to disk, so memory stays flat whatever the file sizes.  Any
error answer of the server raises L{TranscoderError}; network failures raise
its subclasses in L{transcoder.client.errors} (L{CannotConnect},
L{ConnectionLost}, L{NoAnswer}, L{TLSFailure}), each naming the URL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.task import Cooperator, deferLater
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.iweb import IResponse

from transcoder._twisted import RequestNotSent
from transcoder.client.bodies import ProgressCallback
from transcoder.client.errors import (
    NoAnswer,
    TranscoderError,
    as_network_error,
    error_from,
    error_from_text,
    network_failure,
)
from transcoder.client.fetch import fetch, header
from transcoder.client.jobs import JobCallback, RemoteJob
from transcoder.client.outputs import save_outputs
from transcoder.client.paging import JobList
from transcoder.client.retry import Streak, retryable
from transcoder.client.upload import upload

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
    retrying a server that is being restarted.  For C{https://}: C{cacert},
    a PEM file of the certificate authority (or the self-signed certificate)
    to trust instead of the system's; C{verify=False} checks no certificate
    at all.

    C{async with Client(...) as client:} closes it at the end of the block.
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
        cacert: Path | str | None = None,
        verify: bool = True,
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
            from transcoder.client.tls import tls_policy

            agent = Agent(
                reactor,
                contextFactory=tls_policy(cacert, verify),
                pool=self._pool,
                connectTimeout=30,
            )
            http = HTTPClient(agent)
        self._http = http
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))

    def close(self) -> Deferred[None]:
        """Close idle kept-alive connections."""
        self._cooperator.stop()
        if self._pool is not None:
            d: Deferred[None] = self._pool.closeCachedConnections()
            return d
        return Deferred.fromCoroutine(_nothing())

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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
        accept: tuple[int, ...] = (),
    ) -> IResponse:
        url = self._url(path, query)
        try:
            response: IResponse = await self._http.request(
                method,
                url,
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
            ConnectError,
            DNSLookupError,
        ) as e:
            translated = as_network_error(network_failure(e), method, url)
            if translated is e:
                raise
            raise translated from e
        if response.code >= 400 and response.code not in accept:
            raise await error_from(response)
        return response

    def _limit(self, d: Deferred[_T], seconds: float, what: str) -> Deferred[_T]:
        """
        C{d}, cancelled and failed with L{NoAnswer} (a L{TimeoutError}) if it
        takes over C{seconds}; C{what} is the request, C{"GET /jobs"}.
        """

        def timed_out(result: Any, timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                method, _, path = what.partition(" ")
                raise NoAnswer(method, self._base + path, f"nothing within {timeout:g} s")
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
        text = await _content(response, method, self._url(path, query))
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
        *,
        filename: str | None = None,
        callback_url: str | None = None,
        sha256: str | Mapping[str, str] | None = None,
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

        C{filename} names a raw body's input (default: the file's name; the
        download is named after it).  C{callback_url}: the server POSTs the
        job there when it ends.  C{sha256}: the digest the server checks
        the bytes against as they arrive (C{400 digest_mismatch} otherwise),
        a hex string for a one-input profile or a mapping of input names to
        digests.
        """
        return ensureDeferred(
            upload(
                self,
                inputs,
                profile,
                params or {},
                on_progress,
                filename=filename,
                callback_url=callback_url,
                sha256=sha256,
            )
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
        """
        Delete the job (C{DELETE /jobs/<id>}): one queued or running is stopped
        first (its encoder ended), then the job and all its files are removed,
        a finished one's result included.  The id is unknown afterwards (404).
        """
        return ensureDeferred(self._cancel(job_id))

    async def _cancel(self, job_id: str) -> None:
        path = f"/jobs/{quote(job_id, safe='')}"
        await self._limit(
            Deferred.fromCoroutine(self._cancel_now(path)), self._request_timeout, f"DELETE {path}"
        )

    async def _cancel_now(self, path: str) -> None:
        response = await self._request("DELETE", path)
        await _content(response, "DELETE", self._url(path))

    def jobs(self, state: str | None = None, *, page_size: int = 100) -> JobList:
        """
        Every job of the server, newest first (optionally only those in
        C{state}), fetched C{page_size} at a time following the cursor:
        C{async for job in client.jobs():} goes through them page by page,
        C{await client.jobs()} gives them all as a list.
        """
        return JobList(self, state, page_size)

    def page(
        self, state: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Deferred[tuple[list[RemoteJob], str | None]]:
        """One page of C{GET /jobs}: its jobs and the cursor of the next (None on the last)."""
        return ensureDeferred(self._page(state, limit, cursor))

    async def _page(
        self, state: str | None, limit: int | None, cursor: str | None
    ) -> tuple[list[RemoteJob], str | None]:
        data = await self._json("GET", "/jobs", {"state": state, "limit": limit, "cursor": cursor})
        try:
            jobs = [RemoteJob.from_json(j) for j in data["jobs"]]
            following = data.get("next")
        except (KeyError, TypeError, AttributeError):
            raise TranscoderError(0, "bad_response", "no job list in the answer") from None
        return jobs, str(following) if following else None

    def profiles(self) -> Deferred[list[dict[str, Any]]]:
        """C{GET /profiles}: each profile's name, inputs, parameters and outputs."""
        return ensureDeferred(self._profiles())

    async def _profiles(self) -> list[dict[str, Any]]:
        data = await self._json("GET", "/profiles")
        profiles = data.get("profiles") if isinstance(data, dict) else None
        if not isinstance(profiles, list):
            raise TranscoderError(0, "bad_response", "no profile list in the answer")
        return profiles

    def log(self, job_id: str, tail: int | None = None) -> Deferred[str]:
        """The encoder's log of the job (C{GET /jobs/<id>/log}); its last C{tail} lines."""
        return ensureDeferred(self._log(job_id, tail))

    async def _log(self, job_id: str, tail: int | None) -> str:
        path = f"/jobs/{quote(job_id, safe='')}/log"
        query = {"tail": tail} if tail is not None else None
        body = await self._limit(
            Deferred.fromCoroutine(self._text(path, query)), self._request_timeout, f"GET {path}"
        )
        return body.decode("utf-8", "replace")

    async def _text(self, path: str, query: Mapping[str, Any] | None) -> bytes:
        response = await self._request("GET", path, query, headers={b"Accept": b"text/plain"})
        return await _content(response, "GET", self._url(path, query))

    def health(self) -> Deferred[dict[str, Any]]:
        """
        C{GET /health}: C{status} (C{ok}, C{low_disk}, or C{store_failing},
        which the server answers with a 503 but is returned here too),
        version, queued and running jobs, free disk.
        """
        return ensureDeferred(self._health())

    async def _health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._limit(
            Deferred.fromCoroutine(self._health_now()), self._request_timeout, "GET /health"
        )
        return result

    async def _health_now(self) -> dict[str, Any]:
        response = await self._request("GET", "/health", accept=(503,))
        text = await _content(response, "GET", self._url("/health"))
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and "status" in data:
            return data
        if response.code >= 400:
            raise error_from_text(response, text)
        raise TranscoderError(0, "bad_response", "no status in the answer")

    def suggested_name(self, job_id: str) -> Deferred[str | None]:
        """
        The name the server offers the job's result under (its
        C{Content-Disposition}, from a C{HEAD}), as the server sent it: check
        it before using it as a path (L{transcoder.client.names.safe_filename}).
        """
        return ensureDeferred(self._suggested_name(job_id))

    async def _suggested_name(self, job_id: str) -> str | None:
        from transcoder.client.names import disposition_filename

        path = f"/jobs/{quote(job_id, safe='')}/result"
        response = await self._limit(
            Deferred.fromCoroutine(self._request("HEAD", path)),
            self._request_timeout,
            f"HEAD {path}",
        )
        value = header(response, b"content-disposition")
        return disposition_filename(value.decode("latin-1")) if value else None

    def download(
        self,
        job_id: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        retries: int = 5,
        overwrite: bool = True,
    ) -> Deferred[Path]:
        """
        Save the job's result to C{path}, streaming it to C{path}.part and
        renaming it into place once complete (and, when the job states its
        SHA-256, checked); with C{overwrite=False} a file at C{path}, even
        one made during the download, is kept and the call fails with
        L{FileExistsError}.  A dropped or stalled connection is resumed with
        C{Range} from the bytes already saved, at once if bytes came since
        the last try.  Failures in a row with nothing received (a server
        being restarted: refused connections, a 503) are retried after
        growing pauses while there have been at most C{retries} of them or
        the first is less than the client's C{retry_for} seconds old.  A
        C{.part} left by an earlier call is resumed too.
        C{on_progress(received, total)} counts bytes on disk.
        """
        return ensureDeferred(self._download(job_id, Path(path), on_progress, retries, overwrite))

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
        self,
        job_id: str,
        path: Path,
        on_progress: ProgressCallback | None,
        retries: int,
        overwrite: bool = True,
    ) -> Path:
        job = await self._get_again(job_id)
        result = f"/jobs/{quote(job_id, safe='')}/result"
        return await self.fetch(
            result, (job.output or {}).get("sha256"), path, on_progress, retries, overwrite
        )

    async def fetch(
        self,
        result: str,
        expected: str | None,
        path: Path,
        on_progress: ProgressCallback | None,
        retries: int,
        overwrite: bool = True,
    ) -> Path:
        """Save C{result} (a path on the server) to C{path}, as L{download} describes."""
        return await fetch(self, result, expected, path, on_progress, retries, overwrite)


async def _nothing() -> None:
    return None


async def _content(response: Any, method: str, url: str) -> bytes:
    """The answer's body; a connection that breaks before its end is a L{NetworkError}."""
    try:
        content: bytes = await response.content()
    except ResponseFailed as e:
        # As _request does: a cancellation stays one (a timeout says so).
        translated = as_network_error(network_failure(e), method, url)
        if translated is e:
            raise
        raise translated from e
    return content

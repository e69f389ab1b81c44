"""
Webhooks: tell a job's C{callback_url} that the job has finished.

When a job with a callback URL reaches a finished state, its public JSON is
POSTed there once, signed with HMAC-SHA256 when a secret is set.  A delivery
that does not get a 2xx answer is retried with exponential backoff and jitter,
a bounded number of times.  Everything is asynchronous: the registry's
notification only schedules work, and no error ever reaches the registry.

With a journal directory, each delivery is written there when it begins, again
before each attempt (with the count of attempts made) and when its next retry
is due, and removed once it is delivered or given up: deliveries still pending
when the notifier stops (or the server is killed) go on at the next start
where they were, with the same body and delivery id, so that a receiver can
tell a repeat and a job gets at most C{max_attempts} POSTs across restarts.
Without one, they live in memory only and are dropped (and logged) on stop.

Callback URLs that could never be delivered (credentials in them, a host that
is not one) are refused by L{callback_url_problem} when the job is made.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from transcoder import __version__
from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import Job, is_job_id
from transcoder.http.publicurl import BASE_URL_KEY
from transcoder.http.views import job_view

_log = Logger()

SIGNATURE_HEADER = "X-Transcoder-Signature"
EVENT_HEADER = "X-Transcoder-Event"
DELIVERY_HEADER = "X-Transcoder-Delivery"
EVENT_FINISHED = "job.finished"

# A receiver's answer is read and thrown away; beyond this much, the connection is dropped.
_MAX_RESPONSE_BODY = 64 * 1024
# The set of jobs already handled is pruned of deleted jobs when it grows past this.
_PRUNE_AT = 1024


class _HTTP(Protocol):
    """The part of treq's API (C{treq}, L{HTTPClient}, C{StubTreq}) this module uses."""

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]: ...


def sign(secret: bytes, body: bytes) -> str:
    """The value of C{X-Transcoder-Signature} for C{body}: C{sha256=<hex HMAC>}."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | bytes | None) -> bool:
    """Whether C{header} is the signature of C{body} under C{secret}, compared in constant time."""
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    return hmac.compare_digest(sign(secret, body), header.strip())


# Characters left as they are in a callback URL's path and query (RFC 3986's
# unreserved and sub-delims, ":", "@", "/" and an existing "%" escape).
_PATH_SAFE = "/%!$&'()*+,;=:@~-._"
_QUERY_SAFE = _PATH_SAFE + "?"
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def callback_request_url(url: str) -> bytes:
    """
    C{url} as it goes on the wire: ASCII, the host in IDNA, the path and query
    percent-encoded, no fragment.  Raises L{ValueError}, saying why, for a URL
    that could never be delivered, so that it is refused when the job is made
    rather than failing six times after the job ends.
    """
    if not url or len(url) > 2048 or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError("must be an absolute http(s) URL of at most 2048 characters, no spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("must be an http(s) URL")
    if "@" in parts.netloc:
        # They would be stored with the job and logged by proxies on the way.
        raise ValueError(
            "must not hold a user name or password (user:password@host): "
            "sign deliveries with --webhook-secret, or put a token in the query"
        )
    host = parts.hostname or ""
    if not host:
        raise ValueError("has no host")
    if port == 0:
        raise ValueError("has port 0")
    if parts.netloc.startswith("["):
        try:
            if "%" in host:
                raise ValueError
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a bracketed host that is not an IPv6 address") from None
        wire_host = f"[{host}]"
    elif _HOST_NAME.match(host):
        wire_host = host
    else:
        try:
            wire_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("has a host name that is not valid") from None
        if not _HOST_NAME.match(wire_host):
            raise ValueError("has a host name that is not valid")
    path = quote(parts.path, safe=_PATH_SAFE) or "/"
    query = "?" + quote(parts.query, safe=_QUERY_SAFE) if parts.query else ""
    where = f"{wire_host}:{port}" if port is not None else wire_host
    return f"{scheme}://{where}{path}{query}".encode("ascii")


def callback_url_problem(url: str) -> str | None:
    """Why C{url} cannot be a callback URL (to follow "callback_url "), or None if it can."""
    try:
        callback_request_url(url)
    except ValueError as e:
        return str(e)
    return None


def is_callback_url(url: str) -> bool:
    """Whether C{url} is an absolute http(s) URL that a delivery can be made to."""
    return callback_url_problem(url) is None


def _for_log(url: str) -> str:
    """C{url} without credentials or query, which may carry secrets of the receiver."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<invalid URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(eq=False)
class _Delivery:
    job_id: str
    url: str
    body: bytes
    # The same for every attempt, so that a receiver can drop duplicates.
    delivery_id: str
    # Attempts made, those of earlier runs of the server included.
    attempts: int = 0
    # When the next attempt is due, in the reactor's (wall-clock) seconds.
    due: float = 0.0
    timer: IDelayedCall | None = None
    request: Deferred[int] | None = None


class _AgentPoster:
    """
    POSTs through L{twisted.web.client.Agent}, given the URL's wire form.

    Not treq's C{HTTPClient}: treq runs every URL through hyperlink's
    C{to_uri}, which fails on an IPv6 literal (hyperlink issue #68), so a
    callback to C{http://[::1]:8080/} could never be delivered.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._agent: Any = None

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        # Imported here, not at the top: twisted.web.client adds about 0.5 MiB
        # to the server's RSS, and most servers never send a webhook.
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.http_headers import Headers

        if self._agent is None:
            # Not persistent: webhooks are rare and go to many hosts, and nothing
            # is left to close on stop.
            pool = HTTPConnectionPool(self._reactor, persistent=False)
            self._agent = Agent(self._reactor, pool=pool)
        headers = Headers({k: [v] for k, v in kwargs.get("headers", {}).items()})
        # Agent never follows redirects, and hands the answer's body over unread.
        d: Deferred[Any] = self._agent.request(
            b"POST", callback_request_url(url), headers, _BytesProducer(kwargs["data"])
        )
        return d


@implementer(IBodyProducer)
class _BytesProducer:
    """A body already in memory, written at once."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class WebhookNotifier:
    """
    POSTs each finished job's JSON to its C{callback_url}, once per job.

    @param reactor: schedules retries and time limits.
    @param registry: the job registry, whose changes are followed between
        L{start} and L{stop}.
    @param secret: when set, each body is signed (L{SIGNATURE_HEADER}).
    @param http: a treq-like object with C{post}; by default treq over an
        L{Agent} on C{reactor}, made at the first delivery.
    @param max_attempts: attempts per job, the first one included.
    @param base_delay: the delay before the first retry; each further retry
        waits twice as long, up to C{max_delay}.  Each delay is drawn between
        half and all of that, so that many failed deliveries do not retry in step.
    @param timeout: time limit of one attempt, from connecting to reading the answer.
    @param base_url: prefix of the URLs inside the job JSON (C{url}, C{result_url}).
    @param journal: a directory where pending deliveries are kept across
        restarts (see the module docstring); None keeps them in memory only.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        registry: IJobSource,
        *,
        secret: bytes | None,
        http: _HTTP | None = None,
        max_attempts: int = 6,
        base_delay: float = 1.0,
        timeout: float = 10.0,
        max_delay: float = 3600.0,
        base_url: str = "",
        journal: Path | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if base_delay < 0 or timeout <= 0 or max_delay < 0:
            raise ValueError("delays must not be negative and the timeout must be positive")
        self._reactor = reactor
        self._registry = registry
        self._secret = secret
        self._http: _HTTP | None = http
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._timeout = timeout
        self._max_delay = max_delay
        self._base_url = base_url
        self._journal = journal
        self._random: Callable[[], float] = random.random
        self._unsubscribe: Callable[[], None] | None = None
        self._deliveries: set[_Delivery] = set()
        # Jobs whose webhook was already handled: a finished job may be notified again.
        self._handled: set[str] = set()
        self._prune_at = _PRUNE_AT

    @property
    def pending(self) -> int:
        """Deliveries not yet done: in flight or waiting to retry."""
        return len(self._deliveries)

    def start(self) -> None:
        """Follow the registry's changes; send again what the journal holds."""
        if self._unsubscribe is None:
            self._unsubscribe = self._registry.subscribe(self._changed)
            self._resume()

    def stop(self) -> None:
        """Stop following the registry; cancel every retry timer and request in flight."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        deliveries, self._deliveries = self._deliveries, set()
        if deliveries:
            _log.warn(
                "{what} {count} undelivered webhooks on stop: {jobs}",
                what="keeping for the next start" if self._keeps_pending() else "dropping",
                count=len(deliveries),
                jobs=", ".join(sorted(d.job_id for d in deliveries)),
            )
        for delivery in deliveries:
            if delivery.timer is not None and delivery.timer.active():
                delivery.timer.cancel()
            delivery.timer = None
            if delivery.request is not None:
                request, delivery.request = delivery.request, None
                request.cancel()

    # -- internals -----------------------------------------------------------

    def _client(self) -> _HTTP:
        if self._http is None:
            self._http = _AgentPoster(self._reactor)
        return self._http

    def _changed(self, job: Job) -> None:
        # Called by the registry for every change: filter fast, never raise.
        try:
            if not job.state.finished or not job.callback_url or job.id in self._handled:
                return
            self._handled.add(job.id)
            self._prune()
            self._begin(job, job.callback_url)
        except Exception:
            _log.failure("could not schedule the webhook of job {job_id}", job_id=job.id)

    def _prune(self) -> None:
        """Forget deleted jobs, so that the memory of handled jobs follows the registry's size."""
        if len(self._handled) < self._prune_at:
            return
        self._handled = {i for i in self._handled if self._registry.get(i) is not None}
        self._prune_at = max(_PRUNE_AT, 2 * len(self._handled))

    def _begin(self, job: Job, url: str) -> None:
        problem = callback_url_problem(url)
        if problem is not None:
            # Stored before the check got stricter.
            _log.warn(
                "not calling back job {job_id}: its callback_url {problem}",
                job_id=job.id,
                problem=problem,
            )
            return
        # The job may change again (be deleted) before a retry: every attempt sends this snapshot.
        body = json.dumps(self._view(job), separators=(",", ":")).encode("utf-8")
        delivery = _Delivery(job.id, url, body, str(uuid.uuid4()))
        self._deliveries.add(delivery)
        self._attempt(delivery)

    def _view(self, job: Job) -> dict[str, Any]:
        """The job's JSON, its URLs absolute: --public-url, else the upload's Host."""
        return job_view(job, self._base_url or job.extra.get(BASE_URL_KEY) or "")

    # The journal: one small JSON file per pending delivery.

    def _entry(self, job_id: str) -> Path | None:
        return None if self._journal is None else self._journal / f"{job_id}.json"

    def _record(self, delivery: _Delivery) -> None:
        path = self._entry(delivery.job_id)
        if path is None:
            return
        entry = {
            "job_id": delivery.job_id,
            "url": delivery.url,
            "delivery_id": delivery.delivery_id,
            "body": delivery.body.decode("utf-8"),
            "attempts": delivery.attempts,
            "due": delivery.due,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json.dumps(entry), encoding="utf-8")
            # Whole or not at all: a restart never reads half an entry.
            os.replace(partial, path)
        except OSError as e:
            _log.warn(
                "webhook of job {job_id} kept in memory only: {error}",
                job_id=delivery.job_id,
                error=e,
            )

    def _forget(self, delivery: _Delivery) -> None:
        path = self._entry(delivery.job_id)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                _log.warn("could not remove {path}: {error}", path=path, error=e)

    def _resume(self) -> None:
        if self._journal is None or not self._journal.is_dir():
            return
        for path in sorted(self._journal.iterdir()):
            if path.suffix != ".json":
                # A half-written entry of a server that was killed while writing it.
                path.unlink(missing_ok=True)
                continue
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                delivery = _Delivery(
                    str(entry["job_id"]),
                    str(entry["url"]),
                    str(entry["body"]).encode("utf-8"),
                    str(entry["delivery_id"]),
                    # Entries of servers that did not count them yet.
                    int(entry.get("attempts", 0)),
                    float(entry.get("due", 0.0)),
                )
                if not is_job_id(delivery.job_id) or not is_callback_url(delivery.url):
                    raise ValueError("not a delivery")
            except (OSError, ValueError, KeyError, TypeError) as e:
                _log.warn("dropping unreadable webhook entry {path}: {error}", path=path, error=e)
                path.unlink(missing_ok=True)
                continue
            if delivery.job_id in self._handled:
                continue
            self._handled.add(delivery.job_id)
            if delivery.attempts >= self._max_attempts:
                # Killed after its last attempt began, before it ended.
                path.unlink(missing_ok=True)
                _log.error(
                    "giving up on the webhook of job {job_id} to {url}: its {attempts}"
                    " attempts were made before the restart",
                    job_id=delivery.job_id,
                    url=_for_log(delivery.url),
                    attempts=delivery.attempts,
                )
                continue
            self._deliveries.add(delivery)
            # The backoff goes on where it was; a clock set back does not stretch it.
            delay = min(max(0.0, delivery.due - self._reactor.seconds()), self._max_delay)
            _log.info(
                "sending the webhook of job {job_id} again, after a restart"
                " (attempt {next} of {most}, in {delay:.1f}s)",
                job_id=delivery.job_id,
                next=delivery.attempts + 1,
                most=self._max_attempts,
                delay=delay,
            )
            # Not within start(): the service is still starting its other parts.
            delivery.timer = self._reactor.callLater(delay, self._attempt, delivery)

    def _headers(self, delivery: _Delivery) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"transcoder/{__version__} webhooks",
            EVENT_HEADER: EVENT_FINISHED,
            DELIVERY_HEADER: delivery.delivery_id,
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, delivery.body)
        return headers

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.timer = None
        if delivery not in self._deliveries:
            return
        delivery.attempts += 1
        # Counted before it is made: a server killed during the attempt has still made it.
        self._record(delivery)
        request = Deferred.fromCoroutine(self._post(delivery))
        request.addTimeout(self._timeout, self._reactor)
        delivery.request = request
        request.addBoth(self._attempted, delivery, request)

    async def _post(self, delivery: _Delivery) -> int:
        # Redirects are not followed: the receiver was named at upload, not wherever it points.
        import treq

        response = await self._client().post(
            callback_request_url(delivery.url).decode("ascii"),
            data=delivery.body,
            headers=self._headers(delivery),
            allow_redirects=False,
            unbuffered=True,
        )
        code: int = response.code
        try:
            await treq.collect(response, _Discard(_MAX_RESPONSE_BODY))
        except CancelledError:
            raise
        except Exception:
            # The status is what counts; a receiver that sends too much or
            # drops the connection after its headers has still answered.
            pass
        return code

    def _attempted(
        self, result: int | Failure, delivery: _Delivery, request: Deferred[int]
    ) -> None:
        if delivery.request is request:
            delivery.request = None
        if delivery not in self._deliveries:
            # Stopped meanwhile; the cancellation is not worth a log line.
            return
        where = _for_log(delivery.url)
        if isinstance(result, int) and 200 <= result < 300:
            self._deliveries.discard(delivery)
            self._settled(delivery, delivered=True)
            _log.info(
                "webhook of job {job_id} delivered to {url} (HTTP {code}, attempt {attempt})",
                job_id=delivery.job_id,
                url=where,
                code=result,
                attempt=delivery.attempts,
            )
            return
        if isinstance(result, Failure):
            reason = (
                f"{result.type.__name__ if result.type else 'error'}: {result.getErrorMessage()}"
            )
        else:
            reason = f"HTTP {result}"
        if delivery.attempts >= self._max_attempts:
            self._deliveries.discard(delivery)
            self._settled(delivery, delivered=False)
            _log.error(
                "giving up on the webhook of job {job_id} to {url} after {attempts} attempts;"
                " last: {reason}",
                job_id=delivery.job_id,
                url=where,
                attempts=delivery.attempts,
                reason=reason,
            )
            return
        delay = self.retry_delay(delivery.attempts)
        _log.warn(
            "webhook of job {job_id} to {url} failed ({reason}); attempt {next} in {delay:.1f}s",
            job_id=delivery.job_id,
            url=where,
            reason=reason,
            next=delivery.attempts + 1,
            delay=delay,
        )
        self._retry_later(delivery, delay)

    def _keeps_pending(self) -> bool:
        """Whether deliveries pending at stop are sent after it."""
        return self._journal is not None

    def _settled(self, delivery: _Delivery, delivered: bool) -> None:
        """C{delivery} is done with: delivered, or given up."""
        self._forget(delivery)

    def _retry_later(self, delivery: _Delivery, delay: float) -> None:
        """Attempt C{delivery} again in C{delay} seconds."""
        delivery.due = self._reactor.seconds() + delay
        self._record(delivery)
        delivery.timer = self._reactor.callLater(delay, self._attempt, delivery)

    def retry_delay(self, failed_attempts: int) -> float:
        """
        The wait after C{failed_attempts} failures: between half and all of
        C{base_delay * 2 ** (failed_attempts - 1)}, at most C{max_delay}.
        """
        ceiling = min(self._max_delay, self._base_delay * 2.0 ** (failed_attempts - 1))
        return ceiling / 2 + self._random() * ceiling / 2


class _Discard:
    """A body collector that keeps nothing and refuses more than C{limit} bytes."""

    def __init__(self, limit: int) -> None:
        self._left = limit

    def __call__(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            raise ValueError("the receiver's answer is too long")

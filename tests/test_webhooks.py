"""Tests for L{transcoder.http.webhooks}: signed job-finished callbacks with bounded, backed-off retries."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from transcoder.core.jobs import InputFile, Job, JobState, new_job_id
from transcoder.http.views import job_view
from transcoder.http.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    WebhookNotifier,
    callback_request_url,
    callback_url_problem,
    is_callback_url,
    sign,
    verify_signature,
)
from transcoder.testing import FakeJobSource

SECRET = b"s3cret-for-tests"
URL = "http://hooks.example/transcoder?token=abc"


@dataclass
class Received:
    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower().encode("ascii"), [])
        assert len(values) == 1, (name, values)
        return values[0].decode("ascii")


class Receiver(Resource):
    """Records each request; answers with the next status of C{codes} (the last one repeats)."""

    isLeaf = True

    def __init__(self, codes: list[int] | None = None, hang: bool = False) -> None:
        super().__init__()
        self.codes = list(codes or [200])
        self.hang = hang
        self.received: list[Received] = []
        self.lost: list[Failure] = []
        self.arrived: list[Deferred[Received]] = []
        self.answer = b"ok"

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        got = Received(
            request.method,
            request.uri,
            {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
            request.content.read(),
        )
        self.received.append(got)
        waiting, self.arrived = self.arrived, []
        for d in waiting:
            d.callback(got)
        if self.hang:
            request.notifyFinish().addErrback(self.lost.append)
            return NOT_DONE_YET
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        request.setResponseCode(code)
        return self.answer

    def next_request(self) -> Deferred[Received]:
        d: Deferred[Received] = Deferred()
        self.arrived.append(d)
        return d


def finished_job(
    state: JobState = JobState.SUCCEEDED, callback_url: str | None = URL, **kw: Any
) -> Job:
    return Job(
        id=new_job_id(),
        profile="mp4-h264",
        params={"crf": 23},
        inputs=[InputFile("file", "clip.mov", 3, "00" * 32, "input/file.mov")],
        state=state,
        created_at=1_700_000_000.0,
        started_at=1_700_000_001.0 if state is not JobState.QUEUED else None,
        finished_at=1_700_000_010.0 if state.finished else None,
        callback_url=callback_url,
        **kw,
    )


@dataclass
class Env:
    clock: Clock
    registry: FakeJobSource
    receiver: Receiver
    http: StubTreq
    notifier: WebhookNotifier

    def timers(self) -> list[float]:
        """Seconds from now to each pending timer."""
        now = self.clock.seconds()
        return [c.getTime() - now for c in self.clock.getDelayedCalls()]


def make_env(
    codes: list[int] | None = None, hang: bool = False, secret: bytes | None = SECRET, **kw: Any
) -> Env:
    clock = Clock()
    registry = FakeJobSource()
    receiver = Receiver(codes, hang)
    http = StubTreq(receiver)
    notifier = WebhookNotifier(clock, registry, secret=secret, http=http, **kw)
    notifier.start()
    return Env(clock, registry, receiver, http, notifier)


def test_signed_post_of_the_job_json() -> None:
    """A finished job's JSON is POSTed to its callback URL, signed, with event and delivery ids."""
    env = make_env()
    job = finished_job()
    env.registry.change(job)
    assert len(env.receiver.received) == 1
    got = env.receiver.received[0]
    assert got.method == b"POST"
    assert got.path == b"/transcoder?token=abc"
    assert json.loads(got.body) == job_view(job)
    assert got.header("Content-Type") == "application/json"
    assert got.header(EVENT_HEADER) == "job.finished"
    assert uuid.UUID(got.header(DELIVERY_HEADER))
    signature = got.header(SIGNATURE_HEADER)
    # What a receiver would do, from the documented scheme alone.
    expected = "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
    assert signature == expected
    assert verify_signature(SECRET, got.body, signature)
    assert verify_signature(SECRET, got.body, signature.encode("ascii"))
    assert not verify_signature(b"another secret", got.body, signature)
    assert not verify_signature(SECRET, got.body + b" ", signature)
    assert not verify_signature(SECRET, got.body, None)
    assert env.notifier.pending == 0
    assert env.clock.getDelayedCalls() == []


def test_base_url_in_the_body() -> None:
    """With a base URL, the job JSON carries absolute links."""
    env = make_env(base_url="https://transcoder.example")
    job = finished_job()
    env.registry.change(job)
    body = json.loads(env.receiver.received[0].body)
    assert body["url"] == f"https://transcoder.example/jobs/{job.id}"
    assert body["output"] is None or body["output"]["result_url"].startswith("https://")


def test_no_signature_without_secret() -> None:
    """Without a secret the POST carries no signature header, but still the event headers."""
    env = make_env(secret=None)
    env.registry.change(finished_job())
    got = env.receiver.received[0]
    assert SIGNATURE_HEADER.lower().encode() not in got.headers
    assert got.header(EVENT_HEADER) == "job.finished"


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_each_finished_state_calls_back(state: JobState) -> None:
    """Succeeded, failed and cancelled jobs are all called back, with their state in the body."""
    env = make_env()
    env.registry.change(finished_job(state, error="boom" if state is JobState.FAILED else None))
    assert [json.loads(r.body)["state"] for r in env.receiver.received] == [state.value]


def test_only_finished_jobs_with_a_callback_url() -> None:
    """Queued and running jobs, and finished jobs without a callback URL, send nothing."""
    env = make_env()
    job = finished_job(JobState.QUEUED)
    env.registry.change(job)
    job.state = JobState.RUNNING
    job.progress = 50.0
    env.registry.change(job)
    env.registry.change(finished_job(callback_url=None))
    env.registry.change(finished_job(callback_url=""))
    assert env.receiver.received == []
    job.state = JobState.SUCCEEDED
    env.registry.change(job)
    assert len(env.receiver.received) == 1


def test_exactly_once_per_job() -> None:
    """Repeated notifications of a finished job, during and after its delivery, send one POST."""
    env = make_env(codes=[500, 200], base_delay=1.0)
    job = finished_job()
    env.registry.change(job)
    env.registry.change(job)
    assert len(env.receiver.received) == 1
    env.clock.advance(10)
    assert len(env.receiver.received) == 2
    env.registry.change(job)
    env.clock.advance(100)
    assert len(env.receiver.received) == 2
    other = finished_job()
    env.registry.change(other)
    assert json.loads(env.receiver.received[-1].body)["id"] == other.id


def test_retries_with_growing_delays_then_gives_up() -> None:
    """Failures are retried after base*2**n with jitter (half to all of it), max_attempts in all."""
    env = make_env(codes=[500], max_attempts=5, base_delay=2.0)
    env.registry.change(finished_job())
    delays = []
    for attempt in range(1, 5):
        assert len(env.receiver.received) == attempt
        [delay] = env.timers()
        delays.append(delay)
        ceiling = 2.0 * 2 ** (attempt - 1)
        assert ceiling / 2 <= delay <= ceiling
        # Nothing is sent before the delay is over.
        env.clock.advance(delay * 0.99)
        assert len(env.receiver.received) == attempt
        env.clock.advance(delay * 0.01 + 1e-6)
    assert delays == sorted(delays) and len(set(delays)) == len(delays)
    assert len(env.receiver.received) == 5
    # Given up: nothing pending, nothing more sent.
    assert env.clock.getDelayedCalls() == []
    assert env.notifier.pending == 0
    env.clock.advance(10_000)
    assert len(env.receiver.received) == 5


def test_retry_delay_is_capped() -> None:
    """The backoff stops doubling at max_delay."""
    env = make_env(base_delay=1.0, max_delay=60.0)
    for failures in (7, 10, 30):
        assert 30.0 <= env.notifier.retry_delay(failures) <= 60.0
    assert 0.5 <= env.notifier.retry_delay(1) <= 1.0


def test_2xx_stops_retrying() -> None:
    """After failures, a 2xx ends the delivery; every attempt sends the same body and delivery id."""
    env = make_env(codes=[503, 302, 500, 204, 500], max_attempts=6)
    job = finished_job()
    env.registry.change(job)
    # The job changes (or is deleted) meanwhile: retries send the snapshot taken at the end.
    job.progress = 12.0
    env.clock.advance(1000)
    env.clock.advance(1000)
    env.clock.advance(1000)
    env.clock.advance(1000)
    received = env.receiver.received
    assert len(received) == 4
    assert {r.body for r in received} == {received[0].body}
    assert len({r.header(DELIVERY_HEADER) for r in received}) == 1
    assert all(verify_signature(SECRET, r.body, r.header(SIGNATURE_HEADER)) for r in received)
    assert env.clock.getDelayedCalls() == []
    assert env.notifier.pending == 0


def test_a_long_answer_is_still_an_answer() -> None:
    """A receiver answering 200 with a big body has received the webhook (the body is discarded)."""
    env = make_env()
    env.receiver.answer = b"x" * (1 << 20)
    env.registry.change(finished_job())
    assert len(env.receiver.received) == 1
    assert env.notifier.pending == 0
    assert env.clock.getDelayedCalls() == []


def test_timeout_counts_as_a_failure() -> None:
    """A receiver that never answers is cut off after the timeout and retried."""
    env = make_env(hang=True, timeout=10.0, base_delay=1.0, max_attempts=2)
    env.registry.change(finished_job())
    assert len(env.receiver.received) == 1
    # Only the time limit is pending.
    assert env.timers() == [10.0]
    env.clock.advance(10.0)
    # The request was aborted: the receiver saw the connection go.
    env.http.flush()
    assert len(env.receiver.lost) == 1
    [delay] = env.timers()
    assert 0.5 <= delay <= 1.0
    env.clock.advance(delay)
    assert len(env.receiver.received) == 2
    env.clock.advance(10.0)
    assert env.clock.getDelayedCalls() == []
    assert env.notifier.pending == 0


def test_stop_cancels_timers_and_requests() -> None:
    """stop() cancels retry timers and requests in flight, and no later change sends anything."""
    clock = Clock()
    registry = FakeJobSource()
    failing = Receiver([500])
    hanging = Receiver(hang=True)
    failing_notifier = WebhookNotifier(clock, registry, secret=None, http=StubTreq(failing))
    hanging_http = StubTreq(hanging)
    hanging_notifier = WebhookNotifier(clock, registry, secret=None, http=hanging_http)
    for n in (failing_notifier, hanging_notifier):
        n.start()
    registry.change(finished_job())
    assert len(failing.received) == 1 and len(hanging.received) == 1
    # A retry timer for one, a time limit for the other.
    assert len(clock.getDelayedCalls()) == 2
    assert failing_notifier.pending == hanging_notifier.pending == 1
    failing_notifier.stop()
    hanging_notifier.stop()
    assert clock.getDelayedCalls() == []
    assert failing_notifier.pending == hanging_notifier.pending == 0
    # The request in flight was aborted: its server side saw the connection go.
    hanging_http.flush()
    assert len(hanging.lost) == 1
    registry.change(finished_job())
    clock.advance(10_000)
    assert len(failing.received) == 1 and len(hanging.received) == 1
    assert registry.subscribers == []


@dataclass
class FakeResponse:
    code: int
    delivered: list[Any] = field(default_factory=list)

    def deliverBody(self, protocol: Any) -> None:
        self.delivered.append(protocol)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeHTTP:
    """A treq stand-in whose post() does what the test says."""

    def __init__(self, *results: Callable[[], Deferred[Any]]) -> None:
        self.results = list(results)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((url, kwargs))
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        return result()


def _raise() -> Deferred[Any]:
    raise RuntimeError("broken client")


def test_client_errors_are_retried_and_never_raised() -> None:
    """A client that raises or fails (connection refused) is retried; the registry sees no error."""
    clock = Clock()
    registry = FakeJobSource()
    http = FakeHTTP(
        _raise,
        lambda: fail(ConnectionRefusedError()),
        lambda: succeed(FakeResponse(200)),
    )
    notifier = WebhookNotifier(clock, registry, secret=SECRET, http=http, base_delay=1.0)
    notifier.start()
    job = finished_job()
    registry.change(job)
    clock.advance(1.0)
    clock.advance(2.0)
    assert len(http.calls) == 3
    assert notifier.pending == 0
    assert clock.getDelayedCalls() == []
    url, kwargs = http.calls[0]
    assert url == URL
    # Redirects are not followed, and the answer is not buffered in memory.
    assert kwargs["allow_redirects"] is False
    assert kwargs["unbuffered"] is True
    assert kwargs["headers"][SIGNATURE_HEADER] == sign(SECRET, kwargs["data"])


def test_invalid_url_is_not_called() -> None:
    """A callback URL that is not http(s) (stored before validation got stricter) is skipped."""
    clock = Clock()
    registry = FakeJobSource()
    http = FakeHTTP(lambda: succeed(FakeResponse(200)))
    notifier = WebhookNotifier(clock, registry, secret=None, http=http)
    notifier.start()
    for url in ("file:///etc/passwd", "gopher://x/", "http://", "javascript:alert(1)"):
        registry.change(finished_job(callback_url=url))
    assert http.calls == []
    assert notifier.pending == 0


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://example.com/hook", True),
        ("https://example.com:8443/a/b?c=d", True),
        ("http://127.0.0.1:9/", True),
        ("http://[::1]:8080/x", True),
        ("HTTPS://EXAMPLE.COM/", True),
        ("ftp://example.com/", False),
        ("http:///path", False),
        ("http://exa mple.com/", False),
        ("http://example.com/\nX-Injected: 1", False),
        ("http://example.com:99999/", False),
        ("example.com/hook", False),
        ("", False),
        ("http://example.com/" + "a" * 2048, False),
        ("http://user:pw@127.0.0.1:9/cb", False),
        ("http://user@example.com/", False),
        ("http://[fe80::1%25lo]:8080/", False),
        ("http://[v1.x]/", False),
        ("http://example.com:0/", False),
        ("http://exa%20mple.com/", False),
        ("http://my_service:8080/hook", True),
        ("http://b\u00fccher.example/\u00e4", True),
    ],
)
def test_is_callback_url(url: str, ok: bool) -> None:
    """Only http(s) URLs that can be delivered are accepted: a host (a name or an IP address, IPv6 in brackets without a zone), a valid port, no whitespace, no credentials."""
    assert is_callback_url(url) is ok


@pytest.mark.parametrize(
    ("url", "wire"),
    [
        ("http://[::1]:8080/v6?a=b#frag", b"http://[::1]:8080/v6?a=b"),
        ("HTTPS://Example.COM", b"https://example.com/"),
        (
            "http://b\u00fccher.example/\u00e4?q=\u00fc&r=a%20b",
            b"http://xn--bcher-kva.example/%C3%A4?q=%C3%BC&r=a%20b",
        ),
    ],
)
def test_callback_request_url(url: str, wire: bytes) -> None:
    """The URL is sent as ASCII: the host in IDNA, IPv6 literals bracketed, path and query percent-encoded, no fragment."""
    assert callback_request_url(url) == wire


def test_credentials_are_refused_with_a_reason() -> None:
    """A URL with user:password@ is refused with a message that says why (they would be stored and logged)."""
    problem = callback_url_problem("http://user:pw@127.0.0.1:9/cb")
    assert problem is not None and "password" in problem
    assert callback_url_problem("http://127.0.0.1:9/cb") is None


def test_memory_of_handled_jobs_follows_the_registry() -> None:
    """Deleted jobs are forgotten once many have been handled; live ones still get one POST."""
    clock = Clock()
    registry = FakeJobSource()
    http = FakeHTTP(lambda: succeed(FakeResponse(200)))
    notifier = WebhookNotifier(clock, registry, secret=None, http=http)
    notifier.start()
    kept = finished_job()
    registry.change(kept)
    for _ in range(3000):
        job = finished_job()
        registry.change(job)
        del registry.live[job.id]
    assert len(http.calls) == 3001
    assert len(notifier._handled) < 1100
    registry.change(kept)
    assert len(http.calls) == 3001


def test_bad_arguments() -> None:
    """Nonsense limits are refused when the notifier is built."""
    with pytest.raises(ValueError):
        WebhookNotifier(Clock(), FakeJobSource(), secret=None, http=FakeHTTP(), max_attempts=0)
    with pytest.raises(ValueError):
        WebhookNotifier(Clock(), FakeJobSource(), secret=None, http=FakeHTTP(), timeout=0)


@pytest_twisted.ensureDeferred
async def test_real_loopback_server_with_treq() -> None:
    """Through real treq and a real loopback server: a 500 is retried, then the signed POST lands."""
    receiver = Receiver([500, 200])
    port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    registry = FakeJobSource()
    notifier = WebhookNotifier(reactor, registry, secret=SECRET, base_delay=0.05, timeout=5.0)
    notifier.start()
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        first = receiver.next_request()
        job = finished_job(callback_url=url)
        registry.change(job)
        got = await first.addTimeout(10, reactor)
        second = receiver.next_request()
        again = await second.addTimeout(10, reactor)
        assert got.body == again.body
        assert json.loads(again.body) == job_view(job)
        assert verify_signature(SECRET, again.body, again.header(SIGNATURE_HEADER))
        assert again.header(DELIVERY_HEADER) == got.header(DELIVERY_HEADER)
        # Wait until the notifier has read the 200.
        for _ in range(200):
            if notifier.pending == 0:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert notifier.pending == 0
        assert len(receiver.received) == 2
    finally:
        notifier.stop()
        await port.stopListening()


# The journal: pending deliveries survive a restart.


def journal_env(journal: Path, codes: list[int], **kw: Any) -> Env:
    return make_env(codes=codes, journal=journal, **kw)


def test_a_pending_delivery_is_sent_again_after_a_restart(tmp_path: Path) -> None:
    """A delivery still failing when the notifier stops stays in the journal; a new notifier on the same journal sends it once its retry is due, with the same body and delivery id, and forgets it once delivered."""
    journal = tmp_path / "webhooks"
    first = journal_env(journal, codes=[503])
    job = finished_job()
    first.registry.change(job)
    assert len(first.receiver.received) == 1
    assert [p.name for p in journal.iterdir()] == [f"{job.id}.json"]
    first.notifier.stop()
    assert [p.name for p in journal.iterdir()] == [f"{job.id}.json"]

    second = journal_env(journal, codes=[200])
    # Never within start(); the first retry was due 0.5 to 1 s after the first attempt.
    assert second.receiver.received == []
    second.clock.advance(1.0)
    [again] = second.receiver.received
    [before] = first.receiver.received
    assert again.body == before.body
    assert json.loads(again.body) == job_view(job)
    assert again.header(DELIVERY_HEADER) == before.header(DELIVERY_HEADER)
    assert verify_signature(SECRET, again.body, again.header(SIGNATURE_HEADER))
    assert second.notifier.pending == 0
    assert list(journal.iterdir()) == []
    # Announced again by the registry, the job is not called back twice.
    second.registry.change(job)
    assert len(second.receiver.received) == 1


def test_delivered_and_given_up_deliveries_leave_no_entry(tmp_path: Path) -> None:
    """An entry is removed once its delivery succeeds, and once it is given up."""
    journal = tmp_path / "webhooks"
    ok = journal_env(journal, codes=[200])
    ok.registry.change(finished_job())
    assert len(ok.receiver.received) == 1
    assert list(journal.iterdir()) == []
    failing = journal_env(journal, codes=[500], max_attempts=2, base_delay=1.0)
    failing.registry.change(finished_job())
    assert len(list(journal.iterdir())) == 1
    failing.clock.advance(10)
    assert len(failing.receiver.received) == 2
    assert failing.notifier.pending == 0
    assert list(journal.iterdir()) == []


def test_unreadable_journal_entries_are_dropped(tmp_path: Path) -> None:
    """Entries that are not JSON, not a delivery, or left half-written by a killed server are removed at start and send nothing."""
    journal = tmp_path / "webhooks"
    journal.mkdir()
    (journal / f"{new_job_id()}.json").write_text("{not json")
    (journal / f"{new_job_id()}.json").write_text(json.dumps({"job_id": "../../etc"}))
    (journal / f"{new_job_id()}.json").write_text(
        json.dumps({"job_id": new_job_id(), "url": "ftp://x/", "delivery_id": "d", "body": "{}"})
    )
    (journal / f"{new_job_id()}.json.partial").write_text("{")
    env = journal_env(journal, codes=[200])
    env.clock.advance(0)
    assert env.receiver.received == []
    assert list(journal.iterdir()) == []


def test_attempts_are_counted_across_restarts(tmp_path: Path) -> None:
    """A receiver that always fails gets max_attempts POSTs in all, however often the notifier restarts between attempts: the count and the next retry's time are in the journal."""
    journal = tmp_path / "webhooks"
    received: list[Received] = []
    first = journal_env(journal, codes=[500], max_attempts=6)
    first.registry.change(finished_job())
    received += first.receiver.received
    first.notifier.stop()
    for _ in range(10):
        env = journal_env(journal, codes=[500], max_attempts=6)
        # Long past any retry's time: each restart makes at most one attempt.
        env.clock.advance(10_000)
        received += env.receiver.received
        env.notifier.stop()
    assert len(received) == 6
    assert len({r.header(DELIVERY_HEADER) for r in received}) == 1
    assert list(journal.iterdir()) == []


def test_the_backoff_goes_on_after_a_restart(tmp_path: Path) -> None:
    """After a restart the next attempt waits for the rest of its backoff, not less."""
    journal = tmp_path / "webhooks"
    first = journal_env(journal, codes=[500], base_delay=100.0)
    first.registry.change(finished_job())
    [due] = first.timers()
    first.clock.advance(due / 2)
    first.notifier.stop()
    second = journal_env(journal, codes=[500], base_delay=100.0)
    second.clock.advance(first.clock.seconds())
    assert second.receiver.received == []
    second.clock.advance(due / 2 - 0.001)
    assert second.receiver.received == []
    second.clock.advance(0.002)
    assert len(second.receiver.received) == 1


def test_an_entry_whose_attempts_are_spent_is_dropped(tmp_path: Path) -> None:
    """A server killed during a delivery's last attempt leaves an entry that has used them all: the next start drops it and sends nothing."""
    journal = tmp_path / "webhooks"
    journal.mkdir()
    job = finished_job()
    entry = {
        "job_id": job.id,
        "url": URL,
        "delivery_id": str(uuid.uuid4()),
        "body": "{}",
        "attempts": 6,
        "due": 0.0,
    }
    (journal / f"{job.id}.json").write_text(json.dumps(entry))
    env = journal_env(journal, codes=[500], max_attempts=6)
    env.clock.advance(10_000)
    assert env.receiver.received == []
    assert list(journal.iterdir()) == []
    assert env.notifier.pending == 0


@pytest_twisted.ensureDeferred
async def test_an_ipv6_literal_is_delivered() -> None:
    """A callback URL with an IPv6 literal (http://[::1]:port/) reaches a real receiver on ::1 through the default HTTP client."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    receiver = Receiver([200])
    try:
        port = reactor.listenTCP(0, Site(receiver), interface="::1")
    except CannotListenError:
        pytest.skip("no ::1 here")
    registry = FakeJobSource()
    notifier = WebhookNotifier(reactor, registry, secret=SECRET, timeout=5.0)
    notifier.start()
    try:
        arrived = receiver.next_request()
        job = finished_job(callback_url=f"http://[::1]:{port.getHost().port}/v6?x=1")
        registry.change(job)
        got = await arrived.addTimeout(10, reactor)
        assert got.path == b"/v6?x=1"
        assert json.loads(got.body) == job_view(job)
        assert verify_signature(SECRET, got.body, got.header(SIGNATURE_HEADER))
        for _ in range(200):
            if notifier.pending == 0:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert notifier.pending == 0
    finally:
        notifier.stop()
        await port.stopListening()

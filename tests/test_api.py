"""
The HTTP API end to end: every endpoint through the real resource tree, each
answer checked against docs/openapi.yaml with openapi-core.

Most requests go through treq's StubTreq (in memory; a stock Site, so uploads
take the spooled-body path of L{JobsResource.render_POST}); the streaming,
early-refusal and disconnect paths use a real loopback server with
L{TranscoderSite}.  Jobs run on a fake executor, so each test puts them in the
states it needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import pytest
import pytest_twisted
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.response.exceptions import MissingData
from openapi_schema_validator import OAS31Validator
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.twisted import MetricsResource
from rawhttp import connect_raw, split_response
from treq.testing import StubTreq
from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import IResource, Resource
from zope.interface.verify import verifyObject

from transcoder import __version__
from transcoder.core.errors import Invalid, NotFound, Unavailable
from transcoder.core.jobs import JobState, OutputFile
from transcoder.core.profiles import Profile, load_profiles, parse_profiles
from transcoder.core.registry import JobRegistry
from transcoder.core.uploads import InProcessUploadLocks, MemoryUploadStore
from transcoder.http.auth import TokenAuth
from transcoder.http.bodies import IBodyReceiver
from transcoder.http.errors import APIError, http_error
from transcoder.http.job import MAX_TAIL, tail_lines
from transcoder.http.jobs import decode_cursor
from transcoder.http.resources import build_root
from transcoder.http.site import TranscoderSite
from transcoder.http.tusupload import TusUploads
from transcoder.testing import FakeExecution, FakeExecutor, MemoryStore

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
API_MD = SPEC_PATH.parent / "api.md"
SPEC = OpenAPI.from_file_path(str(SPEC_PATH))
SPEC_DICT: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())


def spec_validator(schema: dict[str, Any]) -> OAS31Validator:
    """A validator for a schema of the spec, its $refs resolved against the spec's components."""
    return OAS31Validator({**schema, "components": SPEC_DICT["components"]})


ERROR_SCHEMA = spec_validator({"$ref": "#/components/schemas/Error"})
# What every operation can answer, whatever its path (the spec's description says so).
ANY_OPERATION = {"400", "408", "413", "414", "431", "500"}
HTTP_METHODS = ("get", "head", "post", "put", "delete", "patch", "options")
HOST = "http://127.0.0.1:8080"
TOKENS = "alice:alice-token\nbob:bob-token\n"
PROFILES = load_profiles()
LOG = b"ffmpeg version 5.1\nInput #0\nframe=  10\rframe=  20\rframe=  30\nencoded 75 frames\n"


@dataclass
class Reply:
    code: int
    # Lower-case names, first value of each.
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def conform(method: str, target: str, reply: Reply) -> None:
    """Fail unless C{reply} is what docs/openapi.yaml allows for this request."""
    path, _, query = target.partition("?")
    request = MockRequest(HOST, method.lower(), path, args=dict(parse_qsl(query)))
    response = MockResponse(
        reply.body,
        reply.code,
        headers=reply.headers,
        content_type=reply.headers.get("content-type", ""),
    )
    try:
        SPEC.validate_response(request, response)
    except MissingData:
        # openapi-core takes an empty body for a missing one; an empty log is
        # a valid text/plain string.  Anything else must have its body.
        if not (reply.body == b"" and reply.headers.get("content-type", "").startswith("text/")):
            raise


def conform_component(name: str, reply: Reply, head: bool = False) -> None:
    """
    Fail unless C{reply} is the spec's C{components/responses/<name>}: its
    required headers there and matching their schemas, its body its JSON schema.
    """
    response = SPEC_DICT["components"]["responses"][name]
    for header, declared in response.get("headers", {}).items():
        value = reply.headers.get(header.lower())
        if declared.get("required"):
            assert value is not None, header
        if value is not None:
            spec_validator(declared["schema"]).validate(value)
    ((media_type, content),) = response["content"].items()
    assert reply.headers["content-type"] == media_type
    if reply.body == b"" and head:
        # A HEAD's answer has the error's headers, never its body.
        return
    spec_validator(content["schema"]).validate(reply.json())


def conform_error(reply: Reply, head: bool = False) -> None:
    """
    For answers no operation of the spec can carry: a 405 (to a method no
    operation is declared for; openapi-core finds no operation to check it
    against) must be the spec's MethodNotAllowed response; anything else (an
    unknown path) the common error shape.
    """
    if reply.code == 405:
        conform_component("MethodNotAllowed", reply, head)
        return
    assert reply.headers["content-type"] == "application/json"
    ERROR_SCHEMA.validate(reply.json())


async def sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


@dataclass
class Api:
    clock: Clock
    poll_clock: Clock
    registry: JobRegistry
    executor: FakeExecutor
    data_dir: Path
    root: Resource
    free_disk: list[int]
    stub: StubTreq = field(init=False)

    def __post_init__(self) -> None:
        self.stub = StubTreq(self.root)

    async def settle(self, d: Deferred[Any], timeout: float = 10.0) -> Any:
        """Pump the in-memory connections (and let spool threads report) until C{d} fires."""
        done: list[object] = []
        d.addBoth(lambda r: done.append(r) or r)
        end = time.monotonic() + timeout
        while not done:
            if time.monotonic() > end:
                raise AssertionError("no answer")
            self.stub.flush()
            if not done:
                await sleep(0.001)
        return await d

    async def call(
        self,
        method: str,
        target: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        spec: bool = True,
    ) -> Reply:
        """
        One request through the whole tree; its answer must conform to the
        spec (C{spec=False}: must be the common JSON error).
        """
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        response = await self.settle(
            self.stub.request(method, HOST + target, headers=sent, data=data)
        )
        body = await self.settle(self.stub.content(response))
        flat = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        reply = Reply(response.code, flat, body)
        if spec:
            conform(method, target, reply)
        else:
            conform_error(reply, head=method == "HEAD")
        return reply

    async def upload(
        self, *, token: str | None = None, filename: str = "My Clip.mov", data: bytes = b"video"
    ) -> dict[str, Any]:
        reply = await self.call(
            "PUT", f"/jobs?profile=mp4-h264&filename={quote(filename)}", token=token, data=data
        )
        assert reply.code == 201, reply.body
        assert reply.headers["location"] == f"/jobs/{reply.json()['id']}"
        job: dict[str, Any] = reply.json()
        return job

    def execution(self, job_id: str) -> FakeExecution:
        (found,) = [e for e in self.executor.executions if e.job_id == job_id]
        return found

    def succeed(self, job_id: str, content: bytes) -> None:
        """End the job's (fake) encoder run with a result file and a log."""
        job_dir = self.registry.job_dir(job_id)
        (job_dir / "result.mp4").write_bytes(content)
        (job_dir / "encoder.log").write_bytes(LOG)
        self.execution(job_id).finish(
            JobState.SUCCEEDED,
            output=OutputFile(
                len(content), hashlib.sha256(content).hexdigest(), "video/mp4", "result.mp4", 3.0
            ),
            exit_code=0,
        )

    def succeed_many(self, job_id: str, files: Mapping[str, bytes]) -> None:
        """End the job's (fake) run with several outputs under outputs/, as a multi-output profile's."""
        job_dir = self.registry.job_dir(job_id)
        outputs = []
        for name, content in files.items():
            path = job_dir / "outputs" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            media_type = "application/vnd.apple.mpegurl" if name.endswith(".m3u8") else "video/mp2t"
            outputs.append(
                OutputFile(
                    len(content),
                    hashlib.sha256(content).hexdigest(),
                    media_type,
                    f"outputs/{name}",
                    name=name,
                )
            )
        self.execution(job_id).finish(JobState.SUCCEEDED, outputs=outputs, exit_code=0)


@pytest.fixture
def make_api(tmp_path: Path) -> Callable[..., Api]:
    def make(
        *,
        tokens: str | None = None,
        workers: int = 1,
        max_upload_size: int = 1 << 20,
        max_queued: int | None = None,
        min_free_disk: int = 0,
        metrics: Resource | None = None,
        profiles: Mapping[str, Profile] = PROFILES,
    ) -> Api:
        clock = Clock()
        clock.advance(1_700_000_000)
        executor = FakeExecutor()
        registry = JobRegistry(
            clock,
            MemoryStore(),
            tmp_path,
            profiles,
            workers=workers,
            max_queued=max_queued,
            executor=executor,
        )
        registry.start()
        free = [100 << 30]
        poll_clock = Clock()
        root = build_root(
            reactor,
            registry,
            profiles,
            tmp_path,
            max_upload_size,
            clock=poll_clock,
            auth=TokenAuth.parse(tokens) if tokens else None,
            min_free_disk=min_free_disk,
            free_disk=lambda path: free[0],
            metrics=metrics,
            tus=TusUploads(
                reactor,
                registry,
                profiles,
                MemoryUploadStore(),
                InProcessUploadLocks(clock),
                tmp_path,
                max_upload_size,
                3600,
            ),
        )
        return Api(clock, poll_clock, registry, executor, tmp_path, root, free)

    return make


@asynccontextmanager
async def served(
    api: Api, idle_timeout: float = 10, site: TranscoderSite | None = None
) -> AsyncIterator[int]:
    """The API's tree behind the real L{TranscoderSite} (or C{site}) on a loopback port."""
    if site is None:
        site = TranscoderSite(api.root, reactor=reactor, idle_timeout=idle_timeout)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    try:
        yield port.getHost().port
    finally:
        await port.stopListening()


# -- index, profiles, health, metrics ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_index_and_profiles(make_api: Callable[..., Api]) -> None:
    """/ links to the rest (uploads and the page included); /profiles lists every loaded profile with its parameters."""
    api = make_api()
    reply = await api.call("GET", "/")
    links = reply.json()["links"]
    assert {"jobs", "uploads", "profiles", "health", "ui"} <= set(links)
    assert links["jobs"] == "/jobs" and links["ui"] == "/ui/"
    for path in links.values():
        assert (await api.call("OPTIONS" if path == "/uploads" else "GET", path)).code in (200, 204)
    reply = await api.call("GET", "/profiles")
    assert reply.code == 200
    profiles = {p["name"]: p for p in reply.json()["profiles"]}
    assert set(profiles) == set(PROFILES)
    assert profiles["mp4-h264"]["media_type"] == "video/mp4"
    assert set(profiles["mp4-h264"]["parameters"]) == set(PROFILES["mp4-h264"].parameters)


# Every parameter type, a profile with two inputs and one with needs: what a form needs.
_FORM_PROFILES = """
[mux]
description = "Two inputs."
executable = "ffmpeg"
argv = ["-i", "{video}", "-i", "{audio}", "-metadata", "title={title}", "-an", "{mute}",
        "-q", "{q}", "-g", "{gain}", "-p", "{preset}", "{output}"]
inputs = ["video", "audio"]
needs = { video = ["video"], audio = ["audio"] }
output_extension = "mkv"
media_type = "video/x-matroska"
timeout = 60

[mux.parameters.title]
type = "string"
pattern = "[A-Za-z0-9 ]{1,40}"
default = "untitled"
description = "Title."

[mux.parameters.mute]
type = "bool"
default = false

[mux.parameters.q]
type = "int"
minimum = 1
maximum = 31
default = 4

[mux.parameters.gain]
type = "float"
minimum = -1.5
maximum = 10
default = 1

[mux.parameters.preset]
type = "choice"
choices = ["fast", "slow"]
default = "fast"

[tag]
executable = "ffmpeg"
argv = ["-i", "{file}", "-metadata", "title={title}", "-an", "{mute}", "{output}"]

[tag.parameters.title]
type = "string"
pattern = "[A-Za-z0-9 ]{1,40}"
default = "untitled"

[tag.parameters.mute]
type = "bool"
default = false
"""


@pytest_twisted.ensureDeferred
async def test_a_job_with_bool_and_string_parameters_conforms(
    make_api: Callable[..., Api],
) -> None:
    """A job's params hold a bool as true/false and a string as sent; the job JSON conforms."""
    api = make_api(profiles=parse_profiles(_FORM_PROFILES))
    reply = await api.call("PUT", "/jobs?profile=tag&mute=1&title=Take%202", data=b"x" * 100)
    assert reply.code == 201
    assert reply.json()["params"] == {"title": "Take 2", "mute": True}
    reply = await api.call("PUT", "/jobs?profile=tag&title=-an", data=b"x" * 100)
    assert (reply.code, reply.json()["error"]["code"]) == (422, "invalid_parameter")


@pytest_twisted.ensureDeferred
async def test_profiles_tell_a_client_enough_to_build_a_form(
    make_api: Callable[..., Api],
) -> None:
    """
    GET /profiles gives, per profile, its inputs and the streams each needs,
    every parameter with its type, default, description and range, choices
    or pattern, and its outputs (one file for now: name, extension, media
    type); every built-in and every parameter type conforms to the spec.
    """
    api = make_api()
    built_in = {p["name"]: p for p in (await api.call("GET", "/profiles")).json()["profiles"]}
    assert set(built_in) == {
        "mux-avi",
        "avi-mpeg4",
        "mp4-h264",
        "webm-vp9",
        "audio-mp3",
        "audio-aac",
        "hls",
        "thumbnails",
    }
    h264 = built_in["mp4-h264"]
    assert h264["inputs"] == ["file"] and h264["needs"] == {}
    assert h264["outputs"] == [
        {"name": "result.mp4", "extension": "mp4", "media_type": "video/mp4", "check": "media"}
    ]
    assert h264["parameters"]["height"] == {
        "type": "int",
        "minimum": 16,
        "maximum": 4320,
        "default": 4320,
        "description": PROFILES["mp4-h264"].parameters["height"].description,
    }
    assert h264["parameters"]["preset"]["choices"][0] == "ultrafast"
    assert built_in["audio-aac"]["needs"] == {"file": ["audio"]}
    assert built_in["audio-aac"]["outputs"] == [
        {"name": "result.m4a", "extension": "m4a", "media_type": "audio/mp4", "check": "media"}
    ]
    assert built_in["mux-avi"]["inputs"] == ["video", "audio"]
    assert built_in["thumbnails"]["outputs"] == [
        {
            "name": "thumb-*.jpg",
            "extension": "jpg",
            "media_type": "image/jpeg",
            "check": "image",
            "count": "{count}",
        },
        {"name": "poster.jpg", "extension": "jpg", "media_type": "image/jpeg", "check": "image"},
    ]
    assert [o["check"] for o in built_in["hls"]["outputs"]] == ["hls", "hls", "none"]

    api = make_api(profiles=parse_profiles(_FORM_PROFILES))
    [mux, _] = (await api.call("GET", "/profiles")).json()["profiles"]
    assert mux == {
        "name": "mux",
        "description": "Two inputs.",
        "inputs": ["video", "audio"],
        "needs": {"video": ["video"], "audio": ["audio"]},
        "output_extension": "mkv",
        "media_type": "video/x-matroska",
        "outputs": [
            {
                "name": "result.mkv",
                "extension": "mkv",
                "media_type": "video/x-matroska",
                "check": "media",
            }
        ],
        "timeout": 60.0,
        "parameters": {
            "title": {
                "type": "string",
                "pattern": "[A-Za-z0-9 ]{1,40}",
                "max_length": 256,
                "default": "untitled",
                "description": "Title.",
            },
            "mute": {"type": "bool", "default": False},
            "q": {"type": "int", "minimum": 1, "maximum": 31, "default": 4},
            "gain": {"type": "float", "minimum": -1.5, "maximum": 10, "default": 1.0},
            "preset": {"type": "choice", "choices": ["fast", "slow"], "default": "fast"},
        },
    }


@pytest_twisted.ensureDeferred
async def test_health_reports_version_queue_running_and_disk(
    make_api: Callable[..., Api],
) -> None:
    """/health counts queued and running jobs, reports free disk, and says low_disk below the minimum."""
    api = make_api(min_free_disk=5 << 30)
    await api.upload()
    await api.upload()
    await api.upload()
    reply = await api.call("GET", "/health")
    assert reply.json() == {
        "status": "ok",
        "version": __version__,
        "queued": 2,
        "running": 1,
        "free_disk": 100 << 30,
        "min_free_disk": 5 << 30,
    }
    api.free_disk[0] = 1 << 30
    reply = await api.call("GET", "/health")
    assert reply.json()["status"] == "low_disk"
    assert reply.json()["free_disk"] == 1 << 30


def prometheus_resource() -> Resource:
    registry = CollectorRegistry()
    Counter("transcoder_test_events", "A counter for the test.", registry=registry).inc(3)
    resource: Resource = MetricsResource(registry=registry)
    return resource


@pytest_twisted.ensureDeferred
async def test_metrics_count_uploads_by_outcome(make_api: Callable[..., Api]) -> None:
    """By default /metrics is transcoder.http.metrics', and the upload path reports each upload's outcome and bytes."""
    api = make_api(max_upload_size=1000)
    await api.upload(data=b"x" * 300)
    await api.call("PUT", "/jobs?profile=nope", data=b"x")
    await api.call("PUT", "/jobs?profile=mp4-h264", data=b"x" * 1001)
    await api.call("PUT", "/jobs?profile=mp4-h264&sha256=" + "0" * 64, data=b"y" * 10)
    reply = await api.call("GET", "/metrics")
    assert reply.code == 200
    samples = samples_of(reply)
    assert samples['transcoder_uploads_total{outcome="created"}'] == 1
    assert samples['transcoder_uploads_total{outcome="rejected"}'] == 3
    assert samples['transcoder_uploads_total{outcome="aborted"}'] == 0
    # The created upload's 300 bytes and the digest mismatch's 10 (read, then refused).
    assert samples["transcoder_upload_bytes_total"] == 310


def samples_of(reply: Reply) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in reply.body.decode().splitlines()
        if line and not line.startswith("#")
    }


@pytest_twisted.ensureDeferred
async def test_metrics_count_an_abandoned_upload(make_api: Callable[..., Api]) -> None:
    """A client that hangs up mid-body is counted as an aborted upload, and no job is made."""
    api = make_api()
    async with served(api) as port:
        raw = await connect_raw(
            port,
            b"PUT /jobs?profile=mp4-h264 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            + b"z" * 5000,
        )
        await sleep(0.05)
        assert raw.transport is not None
        raw.transport.loseConnection()
        await raw.closed
        end = time.monotonic() + 5
        while time.monotonic() < end:
            samples = samples_of(await api.call("GET", "/metrics"))
            if samples['transcoder_uploads_total{outcome="aborted"}']:
                break
            await sleep(0.02)
    assert samples['transcoder_uploads_total{outcome="aborted"}'] == 1
    assert samples['transcoder_uploads_total{outcome="created"}'] == 0
    assert api.registry.jobs() == []


@pytest_twisted.ensureDeferred
async def test_metrics_mounted_and_guarded(make_api: Callable[..., Api]) -> None:
    """/metrics serves the metrics resource given, without a token; other methods and sub-paths get JSON errors."""
    api = make_api(tokens=TOKENS, metrics=prometheus_resource())
    reply = await api.call("GET", "/metrics")
    assert reply.code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert b"transcoder_test_events_total 3.0" in reply.body
    reply = await api.call("POST", "/metrics", data=b"x", spec=False)
    assert reply.code == 405
    assert reply.headers["allow"] == "GET, HEAD"
    reply = await api.call("GET", "/metrics/extra", spec=False)
    assert reply.code == 404


# -- creating, reading, listing --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_and_read_a_job(make_api: Callable[..., Api]) -> None:
    """A PUT creates a queued-then-running job; GET /jobs/<id> shows it with its input."""
    api = make_api()
    job = await api.upload(data=b"0123456789")
    reply = await api.call("GET", f"/jobs/{job['id']}")
    shown = reply.json()
    assert shown["id"] == job["id"]
    assert shown["state"] == "running"
    assert shown["inputs"][0]["filename"] == "My Clip.mov"
    assert shown["inputs"][0]["size"] == 10
    assert shown["inputs"][0]["sha256"] == hashlib.sha256(b"0123456789").hexdigest()
    assert shown["output"] is None


@pytest_twisted.ensureDeferred
async def test_upload_errors(make_api: Callable[..., Api]) -> None:
    """Unknown profile 422, too large 413, bad parameter 422, full queue 503 with Retry-After."""
    api = make_api(max_upload_size=100, max_queued=1)
    reply = await api.call("PUT", "/jobs?profile=nope", data=b"x")
    assert (reply.code, reply.json()["error"]["code"]) == (422, "unknown_profile")
    reply = await api.call("PUT", "/jobs?profile=mp4-h264", data=b"x" * 101)
    assert (reply.code, reply.json()["error"]["code"]) == (413, "too_large")
    reply = await api.call("PUT", "/jobs?profile=mp4-h264&crf=99", data=b"x")
    assert (reply.code, reply.json()["error"]["code"]) == (422, "invalid_parameter")
    await api.upload()  # runs
    await api.upload()  # waits
    reply = await api.call("PUT", "/jobs?profile=mp4-h264", data=b"x")
    assert (reply.code, reply.json()["error"]["code"]) == (503, "queue_full")
    assert int(reply.headers["retry-after"]) >= 1


@pytest_twisted.ensureDeferred
async def test_client_errors_come_before_queue_full_and_short_disk(
    make_api: Callable[..., Api],
) -> None:
    """
    With the queue full, or the disk short, a request that could never
    succeed (unknown profile, bad parameter) still gets its own 422, not a
    503 or 507 that would tell it to retry; a good one gets the 503 or 507.
    """
    api = make_api(max_queued=1, min_free_disk=1 << 30)
    await api.upload()  # runs
    await api.upload()  # waits: the queue is full
    for target, code in [
        ("/jobs?profile=nope", "unknown_profile"),
        ("/jobs?profile=mp4-h264&crf=99", "invalid_parameter"),
    ]:
        reply = await api.call("PUT", target, data=b"x")
        assert (reply.code, reply.json()["error"]["code"]) == (422, code)
    reply = await api.call("PUT", "/jobs?profile=mp4-h264", data=b"x")
    assert (reply.code, reply.json()["error"]["code"]) == (503, "queue_full")
    api.free_disk[0] = 1 << 20
    reply = await api.call("PUT", "/jobs?profile=nope", data=b"x")
    assert (reply.code, reply.json()["error"]["code"]) == (422, "unknown_profile")


@pytest_twisted.ensureDeferred
async def test_upload_of_other_multipart_is_415(make_api: Callable[..., Api]) -> None:
    """A multipart/mixed body is 415 unsupported_media_type, as the spec says.  (411 needs a request with no Content-Length at all, which treq never sends: tests/test_upload.py sends one on a socket.)"""
    api = make_api()
    reply = await api.call(
        "POST",
        "/jobs?profile=mp4-h264",
        headers={"Content-Type": "multipart/mixed; boundary=XyZ"},
        data=b"--XyZ--\r\n",
    )
    assert (reply.code, reply.json()["error"]["code"]) == (415, "unsupported_media_type")


@pytest_twisted.ensureDeferred
async def test_listing_newest_first_filtered_and_paged(make_api: Callable[..., Api]) -> None:
    """GET /jobs lists newest first, filters by state, and pages with a cursor that new jobs do not disturb."""
    api = make_api()
    ids = [(await api.upload())["id"] for _ in range(5)]
    reply = await api.call("GET", "/jobs")
    assert [j["id"] for j in reply.json()["jobs"]] == ids[::-1]
    assert reply.json()["next"] is None

    reply = await api.call("GET", "/jobs?state=running")
    assert [j["id"] for j in reply.json()["jobs"]] == [ids[0]]
    reply = await api.call("GET", "/jobs?state=queued&limit=3")
    assert [j["id"] for j in reply.json()["jobs"]] == ids[:0:-1][:3]

    seen: list[str] = []
    reply = await api.call("GET", "/jobs?limit=2")
    seen += [j["id"] for j in reply.json()["jobs"]]
    cursor = reply.json()["next"]
    newer = (await api.upload())["id"]
    while cursor is not None:
        reply = await api.call("GET", f"/jobs?limit=2&cursor={cursor}")
        seen += [j["id"] for j in reply.json()["jobs"]]
        cursor = reply.json()["next"]
    assert seen == ids[::-1]
    assert newer not in seen


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=ten", "limit=-1", "state=done", "cursor=bogus"]
)
@pytest_twisted.ensureDeferred
async def test_listing_bad_query(make_api: Callable[..., Api], query: str) -> None:
    """Out-of-range limits, unknown states and foreign cursors are 400s."""
    api = make_api()
    reply = await api.call("GET", f"/jobs?{query}")
    assert reply.code == 400
    assert reply.json()["error"]["code"] == "bad_query"


def test_cursor_round_trip() -> None:
    """A cursor is opaque text that decodes back to the position it was made from."""
    from transcoder.http.jobs import encode_cursor

    for seq in (1, 42, 10**12):
        cursor = encode_cursor(seq)
        assert str(seq) not in cursor
        assert decode_cursor(cursor) == seq


# -- long-poll -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_long_poll_answers_at_the_next_change(make_api: Callable[..., Api]) -> None:
    """?wait= holds the answer until the job's progress changes, then answers at once and drops its timer."""
    api = make_api()
    job = await api.upload()
    pending = Deferred.fromCoroutine(api.call("GET", f"/jobs/{job['id']}?wait=30"))
    await sleep(0.05)
    assert not pending.called
    assert len(api.poll_clock.getDelayedCalls()) == 1
    api.execution(job["id"]).progress(42.0)
    reply = await pending
    assert reply.json()["progress"] == 42.0
    assert api.poll_clock.getDelayedCalls() == []
    assert api.registry._events.waiters == {}


@pytest_twisted.ensureDeferred
async def test_long_poll_times_out_with_the_current_job(make_api: Callable[..., Api]) -> None:
    """With no change, the answer comes at the end of the wait, with the job as it is."""
    api = make_api()
    job = await api.upload()
    pending = Deferred.fromCoroutine(api.call("GET", f"/jobs/{job['id']}?wait=20"))
    await sleep(0.05)
    api.poll_clock.advance(19.9)
    await sleep(0.05)
    assert not pending.called
    api.poll_clock.advance(0.2)
    reply = await pending
    assert reply.json()["state"] == "running"
    assert api.registry._events.waiters == {}


@pytest_twisted.ensureDeferred
async def test_long_poll_on_finished_job_answers_at_once(make_api: Callable[..., Api]) -> None:
    """A finished job has no next change: ?wait= answers immediately, leaving no timer."""
    api = make_api()
    job = await api.upload()
    api.succeed(job["id"], b"result")
    reply = await api.call("GET", f"/jobs/{job['id']}?wait=60")
    assert reply.json()["state"] == "succeeded"
    assert api.poll_clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_long_poll_job_deleted_meanwhile(make_api: Callable[..., Api]) -> None:
    """Deleting a queued job during a wait ends the wait with the job as cancelled."""
    api = make_api()
    await api.upload()
    queued = await api.upload()
    pending = Deferred.fromCoroutine(api.call("GET", f"/jobs/{queued['id']}?wait=30"))
    await sleep(0.05)
    reply = await api.call("DELETE", f"/jobs/{queued['id']}")
    assert reply.code == 204
    reply = await pending
    assert (reply.code, reply.json()["state"]) == (200, "cancelled")
    assert api.poll_clock.getDelayedCalls() == []


@pytest.mark.parametrize("wait", ["61", "-1", "soon", "nan"])
@pytest_twisted.ensureDeferred
async def test_long_poll_bad_wait(make_api: Callable[..., Api], wait: str) -> None:
    """wait must be a number from 0 to 60."""
    api = make_api()
    job = await api.upload()
    reply = await api.call("GET", f"/jobs/{job['id']}?wait={wait}")
    assert reply.code == 400


@pytest_twisted.ensureDeferred
async def test_abandoned_long_poll_leaves_nothing(make_api: Callable[..., Api]) -> None:
    """A client that disconnects mid-wait takes the timer and the registry's waiter with it."""
    api = make_api()
    job = await api.upload()
    async with served(api) as port:
        raw = await connect_raw(
            port, f"GET /jobs/{job['id']}?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        end = time.monotonic() + 5
        while not api.poll_clock.getDelayedCalls() and time.monotonic() < end:
            await sleep(0.01)
        assert len(api.poll_clock.getDelayedCalls()) == 1
        assert len(api.registry._events.waiters[job["id"]]) == 1
        assert raw.transport is not None
        raw.transport.loseConnection()
        await raw.closed
        end = time.monotonic() + 5
        while api.poll_clock.getDelayedCalls() and time.monotonic() < end:
            await sleep(0.01)
        assert api.poll_clock.getDelayedCalls() == []
        assert api.registry._events.waiters == {}
        assert raw.data == b""


# -- results -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_result_not_ready_names_the_state(make_api: Callable[..., Api]) -> None:
    """While a job is queued, running or failed, its result is a 409 naming the state."""
    api = make_api()
    running = await api.upload()
    queued = await api.upload()
    for job, state in ((running, "running"), (queued, "queued")):
        reply = await api.call("GET", f"/jobs/{job['id']}/result")
        assert reply.code == 409
        assert reply.json()["error"] == {
            "code": "not_ready",
            "message": f"the job is {state}; it has no result to download",
            "state": state,
        }
    api.execution(running["id"]).finish(JobState.FAILED, error="boom", exit_code=1)
    reply = await api.call("GET", f"/jobs/{running['id']}/result")
    assert (reply.code, reply.json()["error"]["state"]) == (409, "failed")
    reply = await api.call("GET", f"/jobs/{running['id']}")
    assert reply.json()["error"]["message"] == "boom"
    reply = await api.call("GET", f"/jobs/{'0' * 32}/result")
    assert reply.code == 404


@pytest_twisted.ensureDeferred
async def test_result_download_headers_ranges_and_conditionals(
    make_api: Callable[..., Api],
) -> None:
    """The result comes with type, ETag, Last-Modified and attachment name; ranges, 416 and 304 work."""
    api = make_api()
    content = os.urandom(50_000)
    job = await api.upload(filename="Holiday 2026.mov")
    api.succeed(job["id"], content)
    url = f"/jobs/{job['id']}/result"

    reply = await api.call("GET", url)
    assert reply.code == 200
    assert reply.body == content
    assert reply.headers["content-type"] == "video/mp4"
    assert reply.headers["content-disposition"] == 'attachment; filename="Holiday 2026.mp4"'
    etag = reply.headers["etag"]
    assert etag == f'"{hashlib.sha256(content).hexdigest()}"'
    mtime = (api.registry.job_dir(job["id"]) / "result.mp4").stat().st_mtime
    assert reply.headers["last-modified"] == formatdate(int(mtime), usegmt=True)

    reply = await api.call("HEAD", url)
    assert (reply.code, reply.body) == (200, b"")

    reply = await api.call("GET", url, headers={"Range": "bytes=100-199"})
    assert reply.code == 206
    assert reply.body == content[100:200]
    assert reply.headers["content-range"] == f"bytes 100-199/{len(content)}"

    reply = await api.call("GET", url, headers={"Range": "bytes=60000-"})
    assert reply.code == 416
    assert reply.headers["content-range"] == f"bytes */{len(content)}"
    assert reply.json()["error"]["code"] == "range_not_satisfiable"

    reply = await api.call("GET", url, headers={"If-None-Match": etag})
    assert (reply.code, reply.body) == (304, b"")
    reply = await api.call(
        "GET", url, headers={"If-Modified-Since": formatdate(mtime + 10, usegmt=True)}
    )
    assert reply.code == 304
    reply = await api.call("GET", url, headers={"If-None-Match": '"old"'})
    assert (reply.code, reply.body) == (200, content)


@pytest.mark.parametrize("change", ["remove", "truncate", "directory", "grow"])
@pytest_twisted.ensureDeferred
async def test_a_result_changed_behind_the_servers_back_is_410(
    make_api: Callable[..., Api], change: str
) -> None:
    """A result removed, cut short, grown or replaced by a directory after the job succeeded: the download (GET, HEAD, with or without If-None-Match) answers 410 result_missing in JSON, never 500 or other bytes under the old ETag, and the job (and the listing) says output.missing."""
    api = make_api()
    content = os.urandom(50_000)
    job = await api.upload()
    api.succeed(job["id"], content)
    url = f"/jobs/{job['id']}/result"
    etag = (await api.call("GET", url)).headers["etag"]
    assert "missing" not in (await api.call("GET", f"/jobs/{job['id']}")).json()["output"]
    result = api.registry.job_dir(job["id"]) / "result.mp4"
    if change == "remove":
        result.unlink()
    elif change == "truncate":
        result.write_bytes(content[:1000])
    elif change == "grow":
        result.write_bytes(content + b"more")
    else:
        result.unlink()
        result.mkdir()
    for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"If-None-Match": etag})):
        reply = await api.call(method, url, headers=headers)
        assert reply.code == 410, (method, reply.body)
        if method == "GET":
            assert reply.json()["error"]["code"] == "result_missing"
    reply = await api.call("GET", f"/jobs/{job['id']}")
    assert reply.json()["state"] == "succeeded"
    assert reply.json()["output"]["missing"] is True
    listed = (await api.call("GET", "/jobs")).json()["jobs"]
    assert [j["output"]["missing"] for j in listed] == [True]


@pytest_twisted.ensureDeferred
async def test_outputs_each_served_and_result_zipped(make_api: Callable[..., Api]) -> None:
    """
    A job with several outputs lists each (name, size, sha256, media type,
    URL) with `output` null; each downloads at its URL, nested names too,
    with ranges, 304 and HEAD as the result; an unknown or escaping name is
    a JSON 404, another method 405; /result is a stored zip of them all; the
    input shows its probe's description; every answer conforms to the spec.
    """
    api = make_api()
    job = await api.upload(filename="clip.mov")
    files = {
        "master.m3u8": b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n240p/index.m3u8\n",
        "240p/index.m3u8": b"#EXTM3U\n#EXTINF:3.0,\nseg-00000.ts\n#EXT-X-ENDLIST\n",
        "240p/seg-00000.ts": os.urandom(5000),
    }
    api.registry.get(job["id"]).inputs[0].media = {  # type: ignore[union-attr]
        "container": "mov,mp4,m4a,3gp,3g2,mj2",
        "duration": 3.0,
        "streams": [
            {"type": "video", "codec": "h264", "width": 320, "height": 240, "frame_rate": 25.0}
        ],
    }
    api.succeed_many(job["id"], files)
    view = (await api.call("GET", f"/jobs/{job['id']}")).json()
    assert view["output"] is None
    assert view["inputs"][0]["media"]["streams"][0]["codec"] == "h264"
    listed = {o["name"]: o for o in view["outputs"]}
    assert set(listed) == set(files)
    base = f"/jobs/{job['id']}/outputs"
    for name, content in files.items():
        assert listed[name]["url"] == f"{base}/{name}"
        reply = await api.call("GET", f"{base}/{name}")
        assert reply.code == 200 and reply.body == content
        assert reply.headers["etag"] == f'"{hashlib.sha256(content).hexdigest()}"'
    reply = await api.call("GET", f"{base}/240p/seg-00000.ts", headers={"Range": "bytes=10-19"})
    assert reply.code == 206 and reply.body == files["240p/seg-00000.ts"][10:20]
    reply = await api.call("HEAD", f"{base}/master.m3u8")
    assert reply.code == 200 and reply.headers["content-type"] == "application/vnd.apple.mpegurl"
    etag = reply.headers["etag"]
    reply = await api.call("GET", f"{base}/master.m3u8", headers={"If-None-Match": etag})
    assert reply.code == 304
    # A client resolves "../" itself (curl, treq): only the encoded form reaches the server.
    for bad in ("nope.ts", "240p", "%2e%2e", "240p/%2E%2E/master.m3u8", "..%2Fencoder.log"):
        # Three levels are beyond what the spec can write out: checked as the common error.
        reply = await api.call("GET", f"{base}/{bad}", spec=bad.count("/") < 2)
        assert reply.code == 404 and reply.json()["error"]["code"] == "not_found", bad
    reply = await api.call("DELETE", f"{base}/master.m3u8", spec=False)
    assert reply.code == 405
    reply = await api.call("GET", f"/jobs/{job['id']}/result")
    assert reply.code == 200 and reply.headers["content-type"] == "application/zip"
    assert reply.headers["content-disposition"] == 'attachment; filename="clip.zip"'
    with zipfile.ZipFile(io.BytesIO(reply.body)) as z:
        assert {i.filename: z.read(i) for i in z.infolist()} == files
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    (api.registry.job_dir(job["id"]) / "outputs" / "240p" / "seg-00000.ts").unlink()
    reply = await api.call("GET", f"{base}/240p/seg-00000.ts")
    assert reply.code == 410 and reply.json()["error"]["code"] == "result_missing"
    reply = await api.call("GET", f"/jobs/{job['id']}/result")
    assert reply.code == 410
    view = (await api.call("GET", f"/jobs/{job['id']}")).json()
    assert [o["name"] for o in view["outputs"] if o.get("missing")] == ["240p/seg-00000.ts"]


@pytest_twisted.ensureDeferred
async def test_curl_saves_the_result_under_its_name(
    make_api: Callable[..., Api], tmp_path: Path
) -> None:
    """curl -OJ against a real server saves the result as <input stem>.<output extension>, byte for byte; curl -r gets a range."""
    api = make_api()
    content = os.urandom(3 << 20)
    job = await api.upload(filename="../etc/My Clip.MOV")
    api.succeed(job["id"], content)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    async with served(api) as port:
        url = f"http://127.0.0.1:{port}/jobs/{job['id']}/result"
        out, err, code = await utils.getProcessOutputAndValue(
            "curl", ["-sS", "-f", "-OJ", url], env=dict(os.environ), path=str(downloads)
        )
        assert code == 0, err
        assert [p.name for p in downloads.iterdir()] == ["My Clip.mp4"]
        assert (downloads / "My Clip.mp4").read_bytes() == content
        out, err, code = await utils.getProcessOutputAndValue(
            "curl", ["-sS", "-f", "-r", "1000-1999", url], env=dict(os.environ)
        )
        assert code == 0, err
        assert out == content[1000:2000]


# -- logs ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_log_whole_and_tail(make_api: Callable[..., Api]) -> None:
    """The log comes as text/plain; ?tail=N gives its last N lines, carriage returns counting as line ends; ranges and If-Modified-Since work as for the result."""
    api = make_api()
    job = await api.upload()
    reply = await api.call("GET", f"/jobs/{job['id']}/log")
    assert (reply.code, reply.body) == (200, b"")
    api.succeed(job["id"], b"out")
    reply = await api.call("GET", f"/jobs/{job['id']}/log")
    assert reply.code == 200
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert reply.body == LOG
    reply = await api.call("GET", f"/jobs/{job['id']}/log?tail=2")
    assert reply.body == b"frame=  30\nencoded 75 frames\n"
    reply = await api.call("GET", f"/jobs/{job['id']}/log?tail={MAX_TAIL + 1}")
    assert reply.code == 400
    reply = await api.call("GET", f"/jobs/{job['id']}/log", headers={"Range": "bytes=0-5"})
    assert (reply.code, reply.body) == (206, LOG[:6])
    assert reply.headers["content-range"] == f"bytes 0-5/{len(LOG)}"
    reply = await api.call("GET", f"/jobs/{job['id']}/log", headers={"Range": "bytes=5000-"})
    assert (reply.code, reply.headers["content-range"]) == (416, f"bytes */{len(LOG)}")
    mtime = (api.registry.job_dir(job["id"]) / "encoder.log").stat().st_mtime
    since = formatdate(mtime + 10, usegmt=True)
    reply = await api.call("GET", f"/jobs/{job['id']}/log", headers={"If-Modified-Since": since})
    assert (reply.code, reply.body) == (304, b"")


def test_tail_lines_reads_only_the_end(tmp_path: Path) -> None:
    """tail_lines finds the last lines of a big file, and never reads more than its cap."""
    path = tmp_path / "big.log"
    with path.open("wb") as f:
        for i in range(200_000):
            f.write(b"line %d\n" % i)
    assert tail_lines(path, 3) == b"line 199997\nline 199998\nline 199999\n"
    assert tail_lines(path, 0) == b""
    capped = tail_lines(path, 100_000, max_bytes=1000)
    assert len(capped) <= 1000
    assert capped.endswith(b"line 199999\n")
    assert capped.startswith(b"line ")
    short = tmp_path / "short.log"
    short.write_bytes(b"only\rtwo")
    assert tail_lines(short, 5) == b"only\ntwo\n"


# -- delete ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_cancels_and_removes(make_api: Callable[..., Api]) -> None:
    """DELETE of a running job stops its encoder, removes the job and its files (204); a second DELETE is 404."""
    api = make_api()
    job = await api.upload()
    job_dir = api.registry.job_dir(job["id"])
    assert job_dir.is_dir()
    pending = Deferred.fromCoroutine(api.call("DELETE", f"/jobs/{job['id']}"))
    await sleep(0.05)
    assert api.execution(job["id"]).cancels == 1
    assert not pending.called
    api.execution(job["id"]).finish(JobState.CANCELLED)
    reply = await pending
    assert (reply.code, reply.body) == (204, b"")
    assert not job_dir.exists()
    assert (await api.call("GET", f"/jobs/{job['id']}")).code == 404
    assert (await api.call("DELETE", f"/jobs/{job['id']}")).code == 404
    assert (await api.call("GET", "/jobs")).json()["jobs"] == []


# -- tokens ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_required_except_health_and_metrics(make_api: Callable[..., Api]) -> None:
    """With tokens, every endpoint but /health and /metrics answers 401 with a Bearer challenge to a missing or wrong token."""
    api = make_api(tokens=TOKENS, metrics=prometheus_resource())
    job = await api.upload(token="alice-token")
    for method, target in [
        ("GET", "/"),
        ("GET", "/jobs"),
        ("GET", "/profiles"),
        ("PUT", "/jobs?profile=mp4-h264"),
        ("GET", f"/jobs/{job['id']}"),
        ("GET", f"/jobs/{job['id']}/result"),
        ("GET", f"/jobs/{job['id']}/log"),
        ("DELETE", f"/jobs/{job['id']}"),
    ]:
        for token in (None, "wrong"):
            data = b"x" if method == "PUT" else None
            reply = await api.call(method, target, token=token, data=data)
            assert reply.code == 401, (method, target, token)
            assert reply.headers["www-authenticate"].startswith("Bearer")
    assert (await api.call("GET", "/health")).code == 200
    assert (await api.call("GET", "/metrics")).code == 200
    assert (await api.call("GET", f"/jobs/{job['id']}", token="alice-token")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_token_sees_only_its_own_jobs(make_api: Callable[..., Api]) -> None:
    """Bob gets 404 for Alice's job on every endpoint, and does not see it listed; Alice does."""
    api = make_api(tokens=TOKENS, workers=2)
    alice = await api.upload(token="alice-token")
    bob = await api.upload(token="bob-token")
    assert api.registry.get(alice["id"]).owner == "alice"  # type: ignore[union-attr]
    api.succeed(alice["id"], b"alice's result")
    for method, suffix in [("GET", ""), ("GET", "/result"), ("GET", "/log"), ("DELETE", "")]:
        reply = await api.call(method, f"/jobs/{alice['id']}{suffix}", token="bob-token")
        assert reply.code == 404, (method, suffix)
    listed = (await api.call("GET", "/jobs", token="bob-token")).json()["jobs"]
    assert [j["id"] for j in listed] == [bob["id"]]
    listed = (await api.call("GET", "/jobs", token="alice-token")).json()["jobs"]
    assert [j["id"] for j in listed] == [alice["id"]]
    reply = await api.call("GET", f"/jobs/{alice['id']}/result", token="alice-token")
    assert reply.body == b"alice's result"


@pytest.mark.parametrize(
    ("tokens", "free", "status", "code"),
    [
        (TOKENS, 100 << 30, 401, "unauthorized"),
        (None, 10 << 20, 507, "insufficient_storage"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_uploads_refused_before_100_continue(
    make_api: Callable[..., Api], tokens: str | None, free: int, status: int, code: str
) -> None:
    """An upload without a token, or with too little disk free, is refused before 100 Continue and nothing is stored."""
    api = make_api(tokens=tokens, min_free_disk=1 << 30)
    api.free_disk[0] = free
    async with served(api) as port:
        raw = await connect_raw(
            port,
            b"PUT /jobs?profile=mp4-h264 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 500000\r\nExpect: 100-continue\r\n\r\n",
        )
        data = await raw.closed
    assert b"100 Continue" not in data
    got, _, body = split_response(data)
    assert got == status
    assert json.loads(body)["error"]["code"] == code
    assert api.registry.jobs() == []
    assert not any((api.data_dir / "uploads").iterdir())


@pytest_twisted.ensureDeferred
async def test_low_disk_upload_is_507(make_api: Callable[..., Api]) -> None:
    """Below --min-free-disk an upload is a 507, and counts against the free space it would use."""
    api = make_api(min_free_disk=1000)
    api.free_disk[0] = 1050
    reply = await api.call("PUT", "/jobs?profile=mp4-h264", data=b"x" * 100)
    assert (reply.code, reply.json()["error"]["code"]) == (507, "insufficient_storage")
    await api.upload(data=b"x" * 10)


# -- errors everywhere are JSON -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unsupported_methods_and_paths_are_json(make_api: Callable[..., Api]) -> None:
    """Wrong methods are JSON 405s listing what is allowed; unknown paths are JSON 404s."""
    api = make_api()
    job = await api.upload()
    for method, target, allowed in [
        ("PATCH", "/jobs", "GET, HEAD, POST, PUT"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/profiles", "GET, HEAD"),
        ("PUT", f"/jobs/{job['id']}", "DELETE, GET, HEAD"),
        ("POST", f"/jobs/{job['id']}/log", "GET, HEAD"),
    ]:
        reply = await api.call(method, target, spec=False)
        assert reply.code == 405, (method, target)
        assert reply.headers["allow"] == allowed
    for target in [
        "/nope",
        f"/jobs/{job['id']}/nope",
        f"/jobs/{job['id']}/log/x",
        "/jobs/not-an-id",
        "/profiles/x",
        "/health/x",
    ]:
        reply = await api.call("GET", target, spec=False)
        assert reply.code == 404, target


@pytest_twisted.ensureDeferred
async def test_malformed_request_is_json_400(make_api: Callable[..., Api]) -> None:
    """Even a request Twisted cannot parse is answered in JSON, not a bare status line."""
    api = make_api()
    async with served(api) as port:
        raw = await connect_raw(port, b"NONSENSE\r\n\r\n")
        data = await raw.closed
    code, headers, body = split_response(data)
    assert code == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "bad_request"


# -- error answers against the spec -------------------------------------------------


def spec_operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, item[method])
        for path, item in SPEC_DICT["paths"].items()
        for method in HTTP_METHODS
        if method in item
    ]


def test_spec_lists_the_errors_of_every_operation() -> None:
    """
    Every operation lists the errors any request can get (400, 408, 413,
    414, 431, 500); every operation that needs a token lists 401; every
    response in components is used, but MethodNotAllowed, which the spec's
    description explains.
    """
    public = {"/health", "/metrics", "/ui/", "/ui/{file}"}
    for path, method, operation in spec_operations():
        statuses = set(operation["responses"])
        assert ANY_OPERATION <= statuses, (method, path, ANY_OPERATION - statuses)
        assert ("401" in statuses) == (path not in public), (method, path)
    text = SPEC_PATH.read_text()
    for name in SPEC_DICT["components"]["responses"]:
        used = f'"#/components/responses/{name}"' in text
        assert used == (name != "MethodNotAllowed"), name
    assert "OperationNotFound" in SPEC_DICT["info"]["description"]


def test_every_status_in_api_md_is_in_the_spec() -> None:
    """Each status of docs/api.md's error table is declared by some operation, or (405) as the MethodNotAllowed response."""
    in_spec = {status for _, _, op in spec_operations() for status in op["responses"]}
    in_spec.add("405")
    table = [line for line in API_MD.read_text().splitlines() if line.strip().startswith("| 4")] + [
        line for line in API_MD.read_text().splitlines() if line.strip().startswith("| 5")
    ]
    documented = {
        status.strip() for line in table for status in line.strip().split("|")[1].split("/")
    }
    assert {"400", "405", "414", "431", "503", "507"} <= documented
    assert documented <= in_spec, documented - in_spec


@pytest_twisted.ensureDeferred
async def test_every_undeclared_method_is_405_allowing_the_declared_ones(
    make_api: Callable[..., Api],
) -> None:
    """
    On each path of the spec, each method no operation is declared for gets
    the spec's MethodNotAllowed answer, and its Allow names exactly the
    declared methods (HEAD with GET), whatever the job's state (a result
    not ready is a 409 to GET only).
    """
    api = make_api()
    job = await api.upload()
    for succeeded in (False, True):
        if succeeded:
            api.succeed(job["id"], b"result")
        for path, item in SPEC_DICT["paths"].items():
            declared = {m.upper() for m in HTTP_METHODS if m in item}
            if "GET" in declared:
                declared.add("HEAD")
            target = path.replace("{id}", job["id"])
            for method in {m.upper() for m in HTTP_METHODS} - declared:
                reply = await api.call(method, target, spec=False)
                assert reply.code == 405, (method, path, succeeded)
                allow = ", ".join(sorted(declared))
                assert reply.headers["allow"] == allow, (method, path, succeeded)


async def exchange(port: int, request: bytes) -> Reply:
    """Send C{request} as it is; the answer, once the server has closed the connection."""
    raw = await connect_raw(port, request)
    code, headers, body = split_response(await raw.closed)
    return Reply(code, headers, body)


def checked(method: str, target: str, reply: Reply, status: int, code: str) -> None:
    assert (reply.code, reply.json()["error"]["code"]) == (status, code), reply.body
    conform(method, target, reply)


class Broken(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        raise RuntimeError("a bug")


@pytest_twisted.ensureDeferred
async def test_errors_any_operation_can_give_conform(make_api: Callable[..., Api]) -> None:
    """
    Over a real server, the errors the spec lists for every operation are
    what the spec says: 400 for a malformed header, 413 for a body where none
    is taken, 414 and 431 for overlong lines, 408 for a head that stops
    coming, 500 for a resource that fails.
    """
    api = make_api(metrics=Broken())
    job = await api.upload()
    async with served(api, idle_timeout=0.5) as port:
        reply = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        checked("GET", "/health", reply, 400, "bad_request")

        reply = await exchange(
            port,
            b"GET /profiles HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"x" * 100_000,
        )
        checked("GET", "/profiles", reply, 413, "too_large")

        target = "/jobs?limit=1&pad=" + "a" * 20_000
        reply = await exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        checked("GET", target, reply, 414, "uri_too_long")

        target = f"/jobs/{job['id']}/log"
        reply = await exchange(
            port, f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Pad: {'b' * 20_000}\r\n\r\n".encode()
        )
        checked("GET", target, reply, 431, "header_too_large")

        target = f"/jobs/{job['id']}"
        reply = await exchange(port, f"DELETE {target} HTTP/1.1\r\nHost: x\r\n".encode())
        checked("DELETE", target, reply, 408, "request_timeout")

        reply = await exchange(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        checked("GET", "/metrics", reply, 500, "internal")
    # The DELETE never arrived whole: the job is still there.
    assert api.registry.get(job["id"]) is not None


@pytest_twisted.ensureDeferred
async def test_upload_that_stalls_mid_body_is_408_too_slow(make_api: Callable[..., Api]) -> None:
    """A client that stops sending halfway through its body gets the spec's 408 too_slow, and no job is made."""
    api = make_api()
    target = "/jobs?profile=mp4-h264"
    async with served(api, idle_timeout=0.5) as port:
        reply = await exchange(
            port,
            f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
            + b"v" * 1000,
        )
    checked("PUT", target, reply, 408, "too_slow")
    assert api.registry.jobs() == []


async def _retry_later(port: int, target: str, code: str) -> Reply:
    """An upload to C{target} that asks for 100-continue: the spec's 503 C{code}, with Retry-After."""
    reply = await exchange(
        port,
        f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\n\r\n".encode(),
    )
    checked("PUT", target, reply, 503, code)
    assert int(reply.headers["retry-after"]) >= 1
    return reply


@pytest_twisted.ensureDeferred
async def test_shutting_down_is_503_with_retry_after(make_api: Callable[..., Api]) -> None:
    """Once the site drains for shutdown, an upload gets the spec's 503 shutting_down with Retry-After."""
    api = make_api()
    site = TranscoderSite(api.root, reactor=reactor, idle_timeout=10)
    assert await site.drain(0) == 0
    target = "/jobs?profile=mp4-h264"
    async with served(api, site=site) as port:
        await _retry_later(port, target, "shutting_down")


@pytest_twisted.ensureDeferred
async def test_upload_under_way_counts_against_max_queued(make_api: Callable[..., Api]) -> None:
    """
    With the one worker busy and room for one queued job, an upload still
    arriving holds that room: another upload gets the spec's 503 queue_full
    before sending its body; the first then becomes the queued job.
    """
    api = make_api(max_queued=1)
    await api.upload()  # runs
    target = "/jobs?profile=mp4-h264"
    site = TranscoderSite(api.root, reactor=reactor, idle_timeout=10)
    async with served(api, site=site) as port:
        arriving = await connect_raw(
            port,
            f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n"
            "Connection: close\r\n\r\n".encode()
            + b"a" * 1000,
        )
        end = time.monotonic() + 5
        while not site.uploads and time.monotonic() < end:
            await sleep(0.01)
        assert len(site.uploads) == 1
        reply = await _retry_later(port, target, "queue_full")
        assert b"100 Continue" not in reply.body
        assert arriving.transport is not None
        arriving.transport.write(b"a" * 1000)
        code, headers, body = split_response(await arriving.closed)
    first = Reply(code, headers, body)
    assert first.code == 201, first.body
    conform("PUT", target, first)
    assert api.registry.get(first.json()["id"]).state is JobState.QUEUED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("target", "headers", "code"),
    [
        ("/jobs?profile=mp4-h264&crf=20&crf=21", {}, "conflicting_fields"),
        ("/jobs?profile=mp4-h264&filename=a.mov&filename=b.mov", {}, "conflicting_fields"),
        (
            "/jobs?profile=mp4-h264",
            {"Repr-Digest": f"sha-256=:{'A' * 43}=:", "Content-Digest": f"sha-256=:{'B' * 43}=:"},
            "conflicting_fields",
        ),
        (f"/jobs?profile=mp4-h264&sha256.audio={'0' * 64}", {}, "bad_digest"),
        (f"/jobs?profile=mp4-h264&sha256={'0' * 63}", {}, "bad_digest"),
        ("/jobs?profile=mp4-h264", {"Content-MD5": "not base64"}, "bad_digest"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_conflicting_fields_and_bad_digests_are_400(
    make_api: Callable[..., Api], target: str, headers: dict[str, str], code: str
) -> None:
    """A field given two values, two digests that differ, a digest that is malformed or names no input of the profile: 400, as the spec says, and no job."""
    api = make_api()
    reply = await api.call("PUT", target, headers=headers, data=b"video")
    assert (reply.code, reply.json()["error"]["code"]) == (400, code)
    assert api.registry.jobs() == []


def form(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A multipart/form-data body (boundary XyZ) of (name, value, filename) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--XyZ--\r\n"


@pytest_twisted.ensureDeferred
async def test_a_field_in_the_query_and_the_form_must_agree(make_api: Callable[..., Api]) -> None:
    """A parameter in the query and again in the form: the same value is one field; two values are 400 conflicting_fields."""
    api = make_api()
    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    body = form(("profile", b"mp4-h264", None), ("crf", b"30", None), ("file", b"vid", "a.mov"))
    reply = await api.call("POST", "/jobs?crf=31", headers=multipart, data=body)
    assert (reply.code, reply.json()["error"]["code"]) == (400, "conflicting_fields")
    reply = await api.call("POST", "/jobs?crf=30", headers=multipart, data=body)
    assert reply.code == 201, reply.body
    assert reply.json()["params"]["crf"] == 30


@pytest_twisted.ensureDeferred
async def test_multipart_digest_headers_cover_the_whole_body(
    make_api: Callable[..., Api],
) -> None:
    """On a multipart upload, Content-MD5 and Repr-Digest are of the whole body as sent, not of the file in it."""
    import base64

    api = make_api()
    video = b"\x00some video bytes\xff" * 50
    body = form(("profile", b"mp4-h264", None), ("file", video, "a.mov"))
    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}

    def b64(digest: bytes) -> str:
        return base64.b64encode(digest).decode()

    for header, wrong, right in [
        ("Content-MD5", b64(hashlib.md5(video).digest()), b64(hashlib.md5(body).digest())),
        (
            "Repr-Digest",
            f"sha-256=:{b64(hashlib.sha256(video).digest())}:",
            f"sha-256=:{b64(hashlib.sha256(body).digest())}:",
        ),
    ]:
        reply = await api.call("POST", "/jobs", headers={**multipart, header: wrong}, data=body)
        assert (reply.code, reply.json()["error"]["code"]) == (400, "digest_mismatch"), header
        reply = await api.call("POST", "/jobs", headers={**multipart, header: right}, data=body)
        assert reply.code == 201, (header, reply.body)
        assert reply.json()["inputs"][0]["sha256"] == hashlib.sha256(video).hexdigest()


@pytest_twisted.ensureDeferred
async def test_multipart_post_creates_a_job(make_api: Callable[..., Api]) -> None:
    """A multipart/form-data POST with the profile and a parameter as fields creates the job."""
    api = make_api()
    video = b"\x00not really a video\xff" * 10
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="profile"\r\n\r\nmp4-h264\r\n'
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="crf"\r\n\r\n30\r\n'
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="file"; filename="beach.mov"\r\n'
        b"Content-Type: video/quicktime\r\n\r\n" + video + b"\r\n--XyZ--\r\n"
    )
    reply = await api.call(
        "POST",
        "/jobs",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert reply.code == 201, reply.body
    job = reply.json()
    assert job["params"]["crf"] == 30
    assert job["inputs"][0]["filename"] == "beach.mov"
    assert job["inputs"][0]["sha256"] == hashlib.sha256(video).hexdigest()


def test_tree_provides_its_interfaces(make_api: Callable[..., Api]) -> None:
    """/jobs takes streamed bodies (IBodyReceiver); the root is an IResource."""
    api = make_api()
    jobs = api.root.children[b"jobs"]
    assert verifyObject(IBodyReceiver, jobs)
    assert verifyObject(IResource, api.root)


@pytest.mark.parametrize(("tokens", "expected"), [(None, "open"), (TOKENS, "2 names")])
def test_start_up_log_says_whether_the_api_is_open(
    make_api: Callable[..., Api], tokens: str | None, expected: str
) -> None:
    """Building the tree without tokens warns that the API is open; with them, says how many names."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        make_api(tokens=tokens)
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [
        formatEvent(e) for e in events if e.get("log_namespace") == "transcoder.http.resources"
    ]
    assert any(expected in t for t in texts), texts


def test_the_cores_refusals_map_to_one_status_each() -> None:
    """Each kind of the core's refusals is answered with its status: invalid 422, not found 404, unavailable 503 with Retry-After; an APIError keeps its own."""
    assert http_error(Invalid("unknown_profile", "no")).status == 422
    assert http_error(NotFound("not_found", "no")).status == 404
    busy = http_error(Unavailable("queue_full", "later", 7))
    assert (busy.status, busy.code, busy.headers) == (503, "queue_full", {"Retry-After": "7"})
    own = APIError(418, "teapot", "short and stout")
    assert http_error(own) is own

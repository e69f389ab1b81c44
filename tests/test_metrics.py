"""Tests for L{transcoder.http.metrics}: the Prometheus metrics and their resource."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import IResource, Resource
from zope.interface.verify import verifyObject

from transcoder.core.jobs import InputFile, Job, JobState, new_job_id
from transcoder.core.profiles import Profile
from transcoder.core.registry import JobRegistry
from transcoder.http.metrics import UPLOAD_OUTCOMES, Metrics
from transcoder.testing import EndingExecutor, FakeJobSource, MemoryStore

T0 = 1_700_000_000.0
PROFILES = {
    name: Profile(name=name, description="test", executable="true", argv=("{file}", "{output}"))
    for name in ("fast", "slow")
}


@dataclass
class Env:
    clock: Clock
    executor: EndingExecutor
    registry: JobRegistry
    metrics: Metrics
    data_dir: Path
    http: StubTreq

    def add(self, profile: str = "fast") -> Job:
        job = Job(
            id=new_job_id(),
            profile=profile,
            params={},
            inputs=[InputFile("file", "clip.mov", 3, "00" * 32, "input/file.mov")],
        )
        d = self.registry.job_dir(job.id)
        (d / "input").mkdir(parents=True)
        (d / "input" / "file.mov").write_bytes(b"abc")
        assert self.registry.add(job).called
        return job

    async def scrape(self) -> Scrape:
        response = await self.http.get("http://transcoder.test/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == [
            prometheus_client.CONTENT_TYPE_LATEST
        ]
        text = (await response.content()).decode("utf-8")
        return Scrape(text)


class Scrape:
    """One parsed scrape."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str) -> list[Sample]:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples(name) if s.labels == labels]
        assert len(found) == 1, (name, labels, self.samples(name))
        return found[0]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    clock = Clock()
    clock.advance(T0)
    executor = EndingExecutor()
    registry = JobRegistry(clock, MemoryStore(), tmp_path, PROFILES, workers=2, executor=executor)
    registry.start()
    metrics = Metrics(registry, tmp_path)
    metrics.start()
    root = Resource()
    root.putChild(b"metrics", metrics.resource())
    return Env(clock, executor, registry, metrics, tmp_path, StubTreq(root))


@pytest_twisted.ensureDeferred
async def test_every_metric_is_exposed(env: Env) -> None:
    """A fresh scrape has every metric, with zero counts for each upload outcome and job state."""
    scrape = await env.scrape()
    assert set(scrape.families) >= {
        "transcoder_upload_bytes",
        "transcoder_uploads",
        "transcoder_jobs",
        "transcoder_queue_depth",
        "transcoder_running_encoders",
        "transcoder_encode_seconds",
        "transcoder_free_disk_bytes",
    }
    assert scrape.families["transcoder_uploads"].type == "counter"
    assert scrape.families["transcoder_encode_seconds"].type == "histogram"
    assert scrape.families["transcoder_jobs"].type == "gauge"
    assert scrape.value("transcoder_upload_bytes_total") == 0
    for outcome in UPLOAD_OUTCOMES:
        assert scrape.value("transcoder_uploads_total", outcome=outcome) == 0
    for state in JobState:
        assert scrape.value("transcoder_jobs", state=state.value) == 0
    assert scrape.value("transcoder_queue_depth") == 0
    assert scrape.value("transcoder_running_encoders") == 0
    free = scrape.value("transcoder_free_disk_bytes")
    # Other processes write to the same disk meanwhile.
    assert abs(free - shutil.disk_usage(env.data_dir).free) < 256 << 20


@pytest_twisted.ensureDeferred
async def test_uploads_are_counted(env: Env) -> None:
    """upload_finished() counts uploads by outcome and adds their bytes."""
    env.metrics.upload_finished("created", 1000)
    env.metrics.upload_finished("created", 500)
    env.metrics.upload_finished("aborted", 20)
    env.metrics.upload_finished("rejected", 0)
    scrape = await env.scrape()
    assert scrape.value("transcoder_upload_bytes_total") == 1520
    assert scrape.value("transcoder_uploads_total", outcome="created") == 2
    assert scrape.value("transcoder_uploads_total", outcome="aborted") == 1
    assert scrape.value("transcoder_uploads_total", outcome="rejected") == 1
    assert scrape.value("transcoder_uploads_total", outcome="failed") == 0


def test_unknown_outcomes_and_negative_sizes_are_refused(env: Env) -> None:
    """A typo in an outcome or a negative size is a programming error, not a new series."""
    with pytest.raises(ValueError):
        env.metrics.upload_finished("succeeded", 1)
    with pytest.raises(ValueError):
        env.metrics.upload_finished("created", -1)
    text = env.metrics.generate().decode()
    assert 'outcome="succeeded"' not in text


@pytest_twisted.ensureDeferred
async def test_job_gauges_follow_the_registry(env: Env) -> None:
    """Jobs by state, queue depth and running encoders are read at each scrape."""
    first, second, third = env.add(), env.add(), env.add()
    scrape = await env.scrape()
    assert scrape.value("transcoder_jobs", state="running") == 2
    assert scrape.value("transcoder_jobs", state="queued") == 1
    assert scrape.value("transcoder_queue_depth") == 1
    assert scrape.value("transcoder_running_encoders") == 2
    env.executor.finish(first)
    env.executor.finish(second, JobState.FAILED)
    scrape = await env.scrape()
    assert scrape.value("transcoder_jobs", state="succeeded") == 1
    assert scrape.value("transcoder_jobs", state="failed") == 1
    assert scrape.value("transcoder_jobs", state="running") == 1
    assert scrape.value("transcoder_queue_depth") == 0
    assert scrape.value("transcoder_running_encoders") == 1
    await env.registry.cancel(third.id)
    await env.registry.delete(first.id)
    scrape = await env.scrape()
    assert scrape.value("transcoder_jobs", state="cancelled") == 1
    assert scrape.value("transcoder_jobs", state="succeeded") == 0
    assert scrape.value("transcoder_running_encoders") == 0


@pytest_twisted.ensureDeferred
async def test_encode_time_histogram(env: Env) -> None:
    """Each job that ran is timed from start to end, by profile; one cancelled while queued is not."""
    fast = env.add("fast")
    slow = env.add("slow")
    queued = env.add("fast")
    assert queued.state is JobState.QUEUED
    await env.registry.cancel(queued.id)
    env.clock.advance(42)
    env.executor.finish(fast)
    env.clock.advance(1000)
    env.executor.finish(slow, JobState.FAILED)
    scrape = await env.scrape()
    assert scrape.value("transcoder_encode_seconds_count", profile="fast") == 1
    assert scrape.value("transcoder_encode_seconds_sum", profile="fast") == 42
    assert scrape.value("transcoder_encode_seconds_bucket", profile="fast", le="30.0") == 0
    assert scrape.value("transcoder_encode_seconds_bucket", profile="fast", le="60.0") == 1
    assert scrape.value("transcoder_encode_seconds_count", profile="slow") == 1
    assert scrape.value("transcoder_encode_seconds_sum", profile="slow") == 1042
    assert scrape.value("transcoder_encode_seconds_bucket", profile="slow", le="600.0") == 0
    assert scrape.value("transcoder_encode_seconds_bucket", profile="slow", le="1200.0") == 1


def finished(profile: str = "fast", took: float = 10.0) -> Job:
    return Job(
        id=new_job_id(),
        profile=profile,
        params={},
        inputs=[],
        state=JobState.SUCCEEDED,
        started_at=T0,
        finished_at=T0 + took,
    )


def test_each_job_is_timed_once(tmp_path: Path) -> None:
    """A finished job notified again is not observed twice; nor after stop()."""
    registry = FakeJobSource()
    metrics = Metrics(registry, tmp_path)
    metrics.start()
    job = finished(took=7)
    registry.change(job)
    registry.change(job)
    scrape = Scrape(metrics.generate().decode())
    assert scrape.value("transcoder_encode_seconds_count", profile="fast") == 1
    assert scrape.value("transcoder_encode_seconds_sum", profile="fast") == 7
    metrics.stop()
    assert registry.subscribers == []
    registry.change(finished(took=3))
    scrape = Scrape(metrics.generate().decode())
    assert scrape.value("transcoder_encode_seconds_count", profile="fast") == 1


def test_memory_of_observed_jobs_follows_the_registry(tmp_path: Path) -> None:
    """Deleted jobs are forgotten once many were timed; live ones are still timed only once."""
    registry = FakeJobSource()
    metrics = Metrics(registry, tmp_path)
    metrics.start()
    kept = finished()
    registry.change(kept)
    for _ in range(3000):
        job = finished()
        registry.change(job)
        del registry.live[job.id]
    assert len(metrics._observed) < 1100
    registry.change(kept)
    scrape = Scrape(metrics.generate().decode())
    assert scrape.value("transcoder_encode_seconds_count", profile="fast") == 3001


def test_instances_do_not_clash(tmp_path: Path) -> None:
    """Two instances count apart, and prometheus_client's global registry is left alone."""
    one = Metrics(FakeJobSource(), tmp_path)
    two = Metrics(FakeJobSource(), tmp_path)
    one.upload_finished("created", 10)
    assert Scrape(one.generate().decode()).value("transcoder_upload_bytes_total") == 10
    assert Scrape(two.generate().decode()).value("transcoder_upload_bytes_total") == 0
    assert b"transcoder_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_missing_data_dir_leaves_out_free_disk(tmp_path: Path) -> None:
    """When free space cannot be read, that one metric is left out and the scrape still works."""
    metrics = Metrics(FakeJobSource(), tmp_path / "gone")
    scrape = Scrape(metrics.generate().decode())
    assert scrape.samples("transcoder_free_disk_bytes") == []
    assert scrape.value("transcoder_queue_depth") == 0


@pytest_twisted.ensureDeferred
async def test_head_and_other_methods(env: Env) -> None:
    """HEAD answers like GET without a body; other methods get a JSON 405 with Allow."""
    resource = env.metrics.resource()
    assert verifyObject(IResource, resource)
    response = await env.http.head("http://transcoder.test/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [prometheus_client.CONTENT_TYPE_LATEST]
    assert await response.content() == b""
    response = await env.http.post("http://transcoder.test/metrics", data=b"x")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]
    body = json.loads(await response.content())
    assert body["error"]["code"] == "method_not_allowed"

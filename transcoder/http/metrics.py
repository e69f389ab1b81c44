"""
Prometheus metrics, through prometheus_client, on a registry of their own.

Upload counters are fed by the upload path (L{Metrics.upload_finished}); the
encode-time histogram by the job registry's changes; job counts, queue depth,
running encoders and free disk are read at scrape time, so they are never stale.
Each node of a cluster has its own; with a C{cluster} reader, each scrape
also reads the cluster's gauges (queued jobs, running jobs per node) from
the shared store first, off the reactor thread.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import Job, JobState
from transcoder.http.responses import JSONResource, disconnected

_log = Logger()

UPLOAD_OUTCOMES = ("created", "rejected", "failed", "aborted")
# Encodes take from seconds (a remux) to hours (a long x264 encode).
ENCODE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
# The set of jobs already observed is pruned of deleted jobs when it grows past this.
_PRUNE_AT = 1024


class Metrics:
    """
    The service's metrics.

    @ivar registry: the L{CollectorRegistry} holding them (not prometheus_client's
        global one, so that several instances do not clash).
    """

    def __init__(
        self,
        registry: IJobSource,
        data_dir: Path,
        cluster: Callable[[], Deferred[tuple[int, dict[str, int]]]] | None = None,
    ) -> None:
        """
        @param cluster: reads (jobs queued, {node: jobs running}) from a store
            that several nodes share.
        """
        self._jobs = registry
        self.cluster = cluster
        self._cluster_gauges = _ClusterCollector()
        self._data_dir = Path(data_dir)
        self.registry = CollectorRegistry()
        self._upload_bytes = Counter(
            "transcoder_upload_bytes",
            "Bytes of upload bodies received, whatever became of the upload.",
            registry=self.registry,
        )
        self._uploads = Counter(
            "transcoder_uploads",
            "Uploads by outcome: created (a job), rejected (refused by the server),"
            " failed (server-side error), aborted (the client went away).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in UPLOAD_OUTCOMES:
            # Present at 0 from the start, so that rate() sees the first increase.
            self._uploads.labels(outcome=outcome)
        self._encode_seconds = Histogram(
            "transcoder_encode_seconds",
            "Time from a job's start to its end, for jobs whose encoder ran"
            " (succeeded, failed or cancelled while running), by profile.",
            ["profile"],
            buckets=ENCODE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ScrapeTimeCollector(self._jobs, self._data_dir))
        if cluster is not None:
            self.registry.register(self._cluster_gauges)
        self._unsubscribe: Callable[[], None] | None = None
        # Jobs already observed: a finished job may be notified again.
        self._observed: set[str] = set()
        self._prune_at = _PRUNE_AT

    def start(self) -> None:
        """Follow the job registry, to time the jobs that finish."""
        if self._unsubscribe is None:
            self._unsubscribe = self._jobs.subscribe(self._changed)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def upload_finished(self, outcome: str, nbytes: int) -> None:
        """
        Count one upload that ended with C{outcome} after C{nbytes} of body.

        @raise ValueError: for an outcome not in L{UPLOAD_OUTCOMES} or a negative size.
        """
        if outcome not in UPLOAD_OUTCOMES:
            raise ValueError(f"unknown upload outcome {outcome!r}")
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        self._uploads.labels(outcome=outcome).inc()
        self._upload_bytes.inc(nbytes)

    def generate(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return _generate_latest(self.registry)

    def generate_later(self) -> Deferred[bytes]:
        """L{generate}, after reading the cluster's gauges (left out when they cannot be read)."""
        if self.cluster is None:
            return succeed(self.generate())

        def read(gauges: tuple[int, dict[str, int]] | None) -> bytes:
            self._cluster_gauges.values = gauges
            return self.generate()

        def unread(f: Any) -> None:
            _log.failure("could not read the cluster's gauges", f)

        return self.cluster().addErrback(unread).addCallback(read)

    def resource(self) -> MetricsResource:
        """A resource answering C{GET} and C{HEAD} with the metrics."""
        return MetricsResource(self)

    def _changed(self, job: Job) -> None:
        # Called by the registry for every change: filter fast, never raise.
        try:
            if not job.state.finished or job.id in self._observed:
                return
            self._observed.add(job.id)
            self._prune()
            # A job cancelled while queued never ran an encoder.
            if job.started_at is not None and job.finished_at is not None:
                took = max(0.0, job.finished_at - job.started_at)
                self._encode_seconds.labels(profile=job.profile).observe(took)
        except Exception:
            _log.failure("could not record the end of job {job_id}", job_id=job.id)

    def _prune(self) -> None:
        """Forget deleted jobs, so that the memory of observed jobs follows the registry's size."""
        if len(self._observed) < self._prune_at:
            return
        self._observed = {i for i in self._observed if self._jobs.get(i) is not None}
        self._prune_at = max(_PRUNE_AT, 2 * len(self._observed))


class _ClusterCollector:
    """The cluster's gauges, as the scrape under way read them."""

    def __init__(self) -> None:
        self.values: tuple[int, dict[str, int]] | None = None

    def describe(self) -> list[Metric]:
        return list(_cluster_families())

    def collect(self) -> Iterator[Metric]:
        if self.values is None:
            return
        queued, running = _cluster_families()
        queued.add_metric([], self.values[0])
        yield queued
        for node, count in sorted(self.values[1].items()):
            running.add_metric([node], count)
        yield running


def _cluster_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "transcoder_cluster_queued_jobs",
            "Jobs waiting for an encoder on any node of the cluster (from the shared store).",
        ),
        GaugeMetricFamily(
            "transcoder_cluster_running_jobs",
            "Jobs running on each node of the cluster (from the shared store).",
            labels=["node"],
        ),
    )


class _ScrapeTimeCollector:
    """The metrics read from the registry and the disk at each scrape."""

    def __init__(self, registry: IJobSource, data_dir: Path) -> None:
        self._registry = registry
        self._data_dir = data_dir

    def describe(self) -> list[Metric]:
        # Names only: without this, registering would run a whole collect().
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        jobs, queue, running, free_disk = _families()
        counts = dict.fromkeys(JobState, 0)
        for job in self._registry.jobs():
            counts[job.state] += 1
        for state, count in counts.items():
            jobs.add_metric([state.value], count)
        yield jobs
        queue.add_metric([], self._registry.queued_count)
        yield queue
        running.add_metric([], self._registry.running_count)
        yield running
        try:
            free = shutil.disk_usage(self._data_dir).free
        except OSError:
            # A scrape must not fail for one value; the gap in the series says enough.
            _log.failure("could not read the free space of {path}", path=str(self._data_dir))
        else:
            free_disk.add_metric([], free)
            yield free_disk


def _families() -> tuple[
    GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
]:
    return (
        GaugeMetricFamily(
            "transcoder_jobs", "Jobs known to the server, by state.", labels=["state"]
        ),
        GaugeMetricFamily("transcoder_queue_depth", "Jobs waiting for an encoder."),
        GaugeMetricFamily("transcoder_running_encoders", "Encoders running now."),
        GaugeMetricFamily("transcoder_free_disk_bytes", "Free space in the data directory."),
    )


class MetricsResource(JSONResource):
    """
    C{/metrics}: the Prometheus text format.  Defined with C{render_GET}, unlike
    prometheus_client's own resource, so that other methods get a JSON 405.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        if self._metrics.cluster is None:
            return self._metrics.generate()

        def send(body: bytes) -> None:
            if disconnected(request):
                return
            request.write(body)
            request.finish()

        self._metrics.generate_later().addCallback(send)
        return NOT_DONE_YET

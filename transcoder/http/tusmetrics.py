"""
The tus uploads' metrics, registered in the service's L{Metrics} registry:
uploads by event (created, finished, terminated, expired), bytes received
through PATCH bodies, and PATCHes in flight.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

TUS_EVENTS = ("created", "finished", "terminated", "expired")


class TusMetrics:
    """C{event} is the L{transcoder.http.tusupload.TusUploads} C{event} callback."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._uploads = Counter(
            "transcoder_tus_uploads",
            "Resumable (tus) uploads by event: created, finished (all bytes in),"
            " terminated (DELETE), expired (removed by the sweeper).",
            ["event"],
            registry=registry,
        )
        for event in TUS_EVENTS:
            self._uploads.labels(event=event)
        self._bytes = Counter(
            "transcoder_tus_bytes",
            "Bytes written durably by tus PATCH bodies (a dropped chunk counts none).",
            registry=registry,
        )
        self._patches = Gauge(
            "transcoder_tus_patches_in_flight",
            "tus PATCH requests holding an upload now.",
            registry=registry,
        )

    def event(self, what: str, n: int) -> None:
        if what in TUS_EVENTS:
            self._uploads.labels(event=what).inc()
        elif what == "bytes":
            self._bytes.inc(max(0, n))
        elif what == "patches":
            self._patches.inc(n)

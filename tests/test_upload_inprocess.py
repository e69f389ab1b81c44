"""
Uploads to a server running in the test's own reactor, for failures that have
to be injected: the disk filling up while a body streams in.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
import treq
from test_spool import FailingFile, settle
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint

from transcoder.core.jobs import JobState
from transcoder.core.profiles import load_profiles
from transcoder.core.registry import JobRegistry
from transcoder.core.sqlite import SQLiteJobStore
from transcoder.http.resources import build_root
from transcoder.http.site import TranscoderSite
from transcoder.testing import FakeExecutor, FakeOutcome


class FailingExecutor(FakeExecutor):
    """Every job fails at once: these tests are about uploads, and nothing must keep running."""

    def __call__(self, reactor, /, **kwargs):  # type: ignore[no-untyped-def]
        execution = super().__call__(reactor, **kwargs)
        execution.deferred.callback(FakeOutcome(JobState.FAILED, error="not encoded in this test"))
        return execution


class DiskFills:
    """An opener whose files fail with ENOSPC after C{limit} bytes, while C{on} is set."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.on = True

    def __call__(self, path: Path):  # type: ignore[no-untyped-def]
        if self.on:
            return FailingFile(path, self.limit)
        return open(path, "xb", buffering=0)


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, Path, DiskFills]]:
    opener = DiskFills(limit=1 << 20)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    registry = JobRegistry(
        reactor, store, tmp_path, load_profiles(), workers=1, executor=FailingExecutor()
    )
    registry.start()
    root = build_root(reactor, registry, load_profiles(), tmp_path, 1 << 30, opener=opener)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TranscoderSite(root, reactor=reactor, idle_timeout=10)
    )
    yield f"http://127.0.0.1:{port.getHost().port}", tmp_path, opener
    await port.stopListening()
    await registry.stop()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_disk_full_mid_upload_answers_507_and_keeps_serving(served) -> None:  # type: ignore[no-untyped-def]
    """ENOSPC while a body streams in: 507 JSON, the partial file removed, and the next upload still works."""
    url, data_dir, opener = served
    fds = fd_count()
    response = await treq.put(
        f"{url}/jobs?profile=avi-mpeg4", data=b"x" * (4 << 20), timeout=30, persistent=False
    )
    body = await response.json()
    assert response.code == 507
    assert body["error"]["code"] == "insufficient_storage"
    uploads = data_dir / "uploads"
    await settle(lambda: not any(uploads.iterdir()))
    assert not any(uploads.iterdir())
    assert not (data_dir / "jobs").exists() or not any((data_dir / "jobs").iterdir())

    opener.on = False
    response = await treq.put(
        f"{url}/jobs?profile=avi-mpeg4", data=b"y" * 5000, timeout=30, persistent=False
    )
    assert response.code == 201
    job = await response.json()
    assert job["inputs"][0]["size"] == 5000
    await settle(lambda: fd_count() <= fds + 2)
    assert fd_count() <= fds + 2


class SlowDisk:
    """An opener whose files take C{delay} seconds over their first write: a disk that falls behind."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, path: Path):  # type: ignore[no-untyped-def]
        return _SlowFile(path, self.delay)


class _SlowFile:
    def __init__(self, path: Path, delay: float) -> None:
        self._f = open(path, "xb", buffering=0)
        self._delay = delay

    def write(self, data: bytes) -> int:
        if self._delay:
            time.sleep(self._delay)
            self._delay = 0
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()


@pytest_twisted.ensureDeferred
async def test_a_client_held_back_by_a_slow_disk_is_not_timed_out(tmp_path: Path) -> None:
    """
    While the server stops reading because its disk is behind, the idle
    timeout (2 s here, the disk 4 s behind) does not blame the client with
    408 too_slow: both uploads, sent at once, are taken whole.
    """
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    registry = JobRegistry(
        reactor, store, tmp_path, load_profiles(), workers=1, executor=FailingExecutor()
    )
    registry.start()
    root = build_root(reactor, registry, load_profiles(), tmp_path, 1 << 30, opener=SlowDisk(4))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TranscoderSite(root, reactor=reactor, idle_timeout=2)
    )
    url = f"http://127.0.0.1:{port.getHost().port}/jobs?profile=avi-mpeg4"
    body = os.urandom(1 << 20) * 24
    try:
        responses = await gatherResults(
            [treq.put(url, data=body, timeout=60, persistent=False) for _ in range(2)]
        )
        answers = [await r.json() for r in responses]
        assert [r.code for r in responses] == [201, 201], answers
        assert all(a["inputs"][0]["size"] == len(body) for a in answers)
    finally:
        await port.stopListening()
        await registry.stop()

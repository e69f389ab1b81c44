"""
A job store that stops taking writes (a full disk, most often): a job's end is
shown only once it is recorded, the registry retries and then records a store
failure, no job starts and no upload is taken meanwhile, and /health says so.

The unit tests drive the registry with a memory store that fails on demand and
a Clock; the end-to-end test fills a real tmpfs under a real server.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tmpfs
from serverproc import ServerProcess, wait_for
from twisted.internet.task import Clock

from transcoder.core.errors import Unavailable
from transcoder.core.jobs import InputFile, Job, JobState, OutputFile, new_job_id
from transcoder.core.profiles import Profile
from transcoder.core.registry import JobRegistry
from transcoder.core.storewriter import STORE_RECHECK
from transcoder.testing import FakeExecutor, MemoryStore

PROFILE = Profile(
    name="copy",
    description="test profile",
    executable="true",
    argv=("{file}", "{output}"),
    output_extension="avi",
    timeout=None,
)
FULL = OSError(errno.ENOSPC, "database or disk is full")
OUTPUT = OutputFile(10, "ee" * 32, "video/x-msvideo", "result.avi", 3.0)


def make(tmp_path: Path, workers: int = 1) -> tuple[Clock, MemoryStore, FakeExecutor, JobRegistry]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore()
    executor = FakeExecutor()
    registry = JobRegistry(
        clock, store, tmp_path, {"copy": PROFILE}, workers=workers, executor=executor
    )
    registry.start()
    return clock, store, executor, registry


def add(registry: JobRegistry) -> Job:
    job = Job(
        id=new_job_id(),
        profile="copy",
        params={},
        inputs=[InputFile("file", "clip.mov", 3, "00" * 32, "input-file.mov")],
    )
    job_dir = registry.job_dir(job.id)
    job_dir.mkdir(parents=True)
    (job_dir / "input-file.mov").write_bytes(b"abc")
    d = registry.add(job)
    assert d.called
    added: Job = d.result
    return added


def test_an_end_the_store_refused_is_not_shown_until_recorded(tmp_path: Path) -> None:
    """An encoder that succeeds while the store fails: the job still shows running (as stored) until a retry records it; then it shows succeeded, as the store does."""
    clock, store, executor, registry = make(tmp_path)
    job = add(registry)
    (execution,) = executor.executions
    store.failing = FULL
    execution.finish(JobState.SUCCEEDED, output=OUTPUT, exit_code=0)
    assert job.state is JobState.RUNNING
    assert store.rows[job.id]["state"] == "running"
    assert registry.store_error is not None
    clock.advance(0.1)
    assert job.state is JobState.RUNNING
    store.failing = None
    clock.advance(0.5)
    assert job.state is JobState.SUCCEEDED
    assert job.output == OUTPUT
    assert store.rows[job.id]["state"] == "succeeded"
    assert registry.store_error is None


def test_a_long_store_failure_records_the_job_as_failed_for_it(tmp_path: Path) -> None:
    """When the retries of a job's end are used up, its result file is removed and the job is recorded as failed saying the store failed, shown only once that is written."""
    clock, store, executor, registry = make(tmp_path)
    job = add(registry)
    result = registry.job_dir(job.id) / "result.avi"
    result.write_bytes(b"x" * 10)
    (execution,) = executor.executions
    store.failing = FULL
    execution.finish(JobState.SUCCEEDED, output=OUTPUT, exit_code=0)
    clock.pump([0.1, 0.5, 1.0, 2.0])
    assert not result.exists()
    assert job.state is JobState.RUNNING
    clock.advance(STORE_RECHECK)
    assert job.state is JobState.RUNNING
    store.failing = None
    clock.advance(STORE_RECHECK)
    assert job.state is JobState.FAILED
    assert job.output is None
    assert job.error is not None and "could not record" in job.error
    assert "database or disk is full" in job.error
    assert store.rows[job.id]["state"] == "failed"
    assert store.rows[job.id]["error"] == job.error


def test_a_failing_store_stops_new_work_until_it_takes_a_write(tmp_path: Path) -> None:
    """While the store fails, uploads are refused (store_unavailable) and queued jobs do not start; a periodic test write finds it working again, and the queue moves."""
    clock, store, executor, registry = make(tmp_path)
    first = add(registry)
    second = add(registry)
    (execution,) = executor.executions
    store.failing = FULL
    execution.finish(JobState.FAILED, exit_code=1, error="boom")
    with pytest.raises(Unavailable) as refused:
        registry.check_capacity()
    assert refused.value.code == "store_unavailable"
    assert refused.value.retry_after > 0
    clock.pump([0.1, 0.5, 1.0, 2.0, STORE_RECHECK])
    assert len(executor.executions) == 1
    assert second.state is JobState.QUEUED
    writes = store.failed_writes
    store.failing = None
    clock.advance(STORE_RECHECK)
    assert store.failed_writes == writes
    assert registry.store_error is None
    registry.check_capacity()
    assert first.state is JobState.FAILED
    assert [e.job_id for e in executor.executions] == [first.id, second.id]
    assert second.state is JobState.RUNNING


def test_a_job_deleted_while_its_end_waits_is_not_written_back(tmp_path: Path) -> None:
    """A job deleted while the record of its end waits for the store is gone for good: the retry does not write its row back."""
    clock, store, executor, registry = make(tmp_path)
    job = add(registry)
    (execution,) = executor.executions
    store.failing = FULL
    execution.finish(JobState.SUCCEEDED, output=OUTPUT, exit_code=0)
    store.failing = None
    deleted = registry.delete(job.id)
    assert deleted.called and deleted.result is True
    clock.pump([0.1, 0.5, 1.0, 2.0, STORE_RECHECK])
    assert job.id not in store.rows
    assert registry.get(job.id) is None


def test_stop_gives_up_on_an_end_it_cannot_record(tmp_path: Path) -> None:
    """Stopping while a job's end cannot be recorded ends the wait: the job keeps its stored state (running), so the next start runs it again."""
    clock, store, executor, registry = make(tmp_path)
    job = add(registry)
    (execution,) = executor.executions
    store.failing = FULL
    execution.finish(JobState.SUCCEEDED, output=OUTPUT, exit_code=0)
    stopped = registry.stop()
    clock.pump([0.1, 0.5])
    assert stopped.called
    assert store.rows[job.id]["state"] == "running"
    assert job.state is JobState.RUNNING


# End to end: a real server whose data dir fills up behind its back

MiB = 1 << 20

# An encoder that writes nothing and waits: the disk fills under it (the test
# fills it, as another program on the machine might), so the server stops it,
# and recording that end fails, since nothing of the job's frees any space.
PROFILES = f"""
[wait]
description = "Wait a minute, write nothing."
executable = {json.dumps(sys.executable)}
argv = ["-c", "import time; time.sleep(60)", "{{file}}", "{{output}}"]
output_extension = "mp4"
"""


def _fill(path: Path) -> None:
    """Take every free byte of C{path}'s filesystem."""
    with path.open("wb", buffering=0) as f:
        st = os.statvfs(path)
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
        for size in (4096, 512, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError:
                    break


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _put(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=data, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tmpfs", "16m") as mountpoint:
        yield mountpoint


def _stored_state(data_dir: Path, job_id: str) -> str:
    import sqlite3

    conn = sqlite3.connect(data_dir / "jobs.sqlite3")
    try:
        (state,) = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return str(state)


def test_a_full_disk_never_shows_a_state_the_database_lacks(
    small_disk: Path, tmp_path: Path, clips: Any
) -> None:
    """The disk fills while an encoder runs and the server stops it: the API keeps the stored state (running) while that end cannot be written, /health answers 503 store_failing and uploads get 503 store_unavailable; once space is back the job shows one final state, the same in the database and after a restart."""
    profiles = tmp_path / "wait.toml"
    profiles.write_text(PROFILES)
    data = small_disk / "data"
    args = ("--min-free-disk", "0", "--workers", "1", "--profiles", str(profiles))
    server = ServerProcess(data, *args)
    try:
        status, job = _put(f"{server.url}/jobs?profile=wait", clips.av.read_bytes())
        assert status == 201, job
        job_url = f"{server.url}/jobs/{job['id']}"
        assert wait_for(lambda: _get(job_url)[1]["state"] == "running", timeout=30)
        ballast = data / "ballast"
        _fill(ballast)
        health_url = f"{server.url}/health"
        assert wait_for(lambda: _get(health_url)[0] == 503, timeout=30), server.output
        code, health = _get(health_url)
        assert code == 503, health
        assert health["status"] == "store_failing", health
        assert health["store_error"], health
        # --min-free-disk 0 still keeps the database's headroom for uploads.
        assert health["min_free_disk"] == 1 << 20, health
        _, seen = _get(job_url)
        assert seen["state"] == "running", seen
        assert _stored_state(data, job["id"]) == "running"
        status, refused = _put(f"{server.url}/jobs?profile=wait", b"x" * 1000)
        assert status == 503, refused
        assert refused["error"]["code"] == "store_unavailable"

        ballast.unlink()
        assert wait_for(lambda: _get(job_url)[1]["state"] != "running", timeout=30)
        _, final = _get(job_url)
        assert final["state"] == "failed", final
        assert _stored_state(data, job["id"]) == "failed"
        assert wait_for(lambda: _get(health_url)[0] == 200, timeout=10)
    finally:
        server.stop()
    assert "the job store takes writes again" in server.output, server.output

    again = ServerProcess(data, *args)
    try:
        _, after = _get(f"{again.url}/jobs/{job['id']}")
        assert after["state"] == "failed"
        assert after["error"] == final["error"]
    finally:
        again.stop()
    assert shutil.disk_usage(small_disk).free > MiB

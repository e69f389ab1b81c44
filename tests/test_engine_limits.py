"""
The job engine's limits, held by a real server process with real encoders:
at most C{--workers} encoders at once, started in FIFO order; C{--max-queued}
refusing uploads before their body; and SIGTERM leaving no encoder behind and
the interrupted jobs queued for the next start.

Encoders are seen as the kernel sees them (/proc), not as the server reports
them.  The paced profile (see C{test_recovery}) makes each job last as long as
its clip, whatever the machine's load.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess, serve
from test_recovery import (
    PACED_PROFILE,
    alive,
    check_result,
    encoders,
    finished,
    get_json,
    make_clip,
    paced_profiles,
    upload,
    wait_job,
)

from transcoder.core.jobs import Job

__all__ = ["paced_profiles"]  # a fixture, imported to be found here


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "one.mp4", 1)


@pytest.fixture(scope="module")
def three_s_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "three.mp4", 3)


class _Sampler:
    """Samples the live encoders under a data dir until stopped."""

    def __init__(self, data_dir: Path) -> None:
        # (wall-clock time, ids of the jobs whose encoder runs)
        self.samples: list[tuple[float, set[str]]] = []
        self._data_dir = data_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = {cwd.name for cwd in encoders(self._data_dir).values()}
            self.samples.append((time.time(), jobs))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def first_seen(self, job_id: str) -> float:
        """When the job's encoder was first seen running."""
        return next(t for t, jobs in self.samples if job_id in jobs)


@pytest.fixture
def sampler(tmp_path: Path) -> Iterator[_Sampler]:
    s = _Sampler(tmp_path / "data")
    yield s
    s.stop()


def test_workers_cap_and_fifo(
    tmp_path: Path, paced_profiles: Path, short_clip: Path, sampler: _Sampler
) -> None:
    """
    With --workers 2 and six jobs queued at once, no more than two encoder
    processes ever run at the same time (and two do), and the jobs start in
    the order they were uploaded.
    """
    data = tmp_path / "data"
    server = serve(
        data, tmp_path / "server.log", "--profiles", str(paced_profiles), "--workers", "2"
    )
    try:
        ids = [upload(server.url, short_clip, PACED_PROFILE)["id"] for _ in range(6)]
        done = [wait_job(server.url, job_id, finished) for job_id in ids]
        sampler.stop()
    finally:
        server.stop()
    assert [j["state"] for j in done] == ["succeeded"] * 6, done
    most = max(len(jobs) for _, jobs in sampler.samples)
    assert most == 2, f"at most {most} encoders at once over {len(sampler.samples)} samples"
    started = [_epoch(j["started_at"]) for j in done]
    assert started == sorted(started), started
    # Each of the last four started only when one of the first ones had ended.
    assert min(started[2:]) >= min(_epoch(j["finished_at"]) for j in done[:2])
    # The processes agree: no job's encoder ran before every earlier job had
    # started.  (Two jobs started together may spawn in either order: each
    # probes its input first.)  started_at is cut to milliseconds.
    for k, job_id in enumerate(ids):
        assert sampler.first_seen(job_id) >= max(started[: k + 1]) - 0.002, (k, started)


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@contextmanager
def one_job_running(
    tmp_path: Path, paced_profiles: Path, clip: Path, *extra: str
) -> Iterator[tuple[ServerProcess, dict[str, Any]]]:
    """A server with --workers 1 --max-queued 1 (and C{extra}), running one paced job of C{clip}."""
    server = serve(
        tmp_path / "data",
        tmp_path / "server.log",
        *("--profiles", str(paced_profiles), "--workers", "1", "--max-queued", "1"),
        *extra,
    )
    try:
        first = upload(server.url, clip, PACED_PROFILE)
        assert first["state"] == "running"
        yield server, first
    finally:
        server.stop()


def test_max_queued_refuses_before_the_body(
    tmp_path: Path, paced_profiles: Path, three_s_clip: Path
) -> None:
    """
    With --workers 1 --max-queued 1, one job running and one queued, a new
    upload that asks for 100-continue gets 503 with Retry-After and a JSON
    error at once, without 100 Continue and without a byte of its body sent.
    """
    data = tmp_path / "data"
    with one_job_running(tmp_path, paced_profiles, three_s_clip) as (server, first):
        second = upload(server.url, three_s_clip, PACED_PROFILE)
        assert second["state"] == "queued"

        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                f"PUT /jobs?profile={PACED_PROFILE} HTTP/1.1\r\nHost: x\r\n"
                "Content-Length: 1073741824\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            answer = _read_response(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "HTTP/1.1 503 Service Unavailable", answer
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert int(headers["Retry-After"]) >= 1
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["error"]["code"] == "queue_full"
        assert b"100 Continue" not in answer

        jobs = get_json(server.url + "/jobs")["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted([first["id"], second["id"]])
        assert list((data / "uploads").iterdir()) == []


def test_max_queued_counts_uploads_in_flight(
    tmp_path: Path, paced_profiles: Path, three_s_clip: Path
) -> None:
    """
    With --workers 1 --max-queued 1 and one job running, an upload still
    arriving holds the one queue place: a second upload that starts meanwhile
    gets 503 queue_full before its body, and the first, once complete, is
    queued.  (The check runs before each body, so without counting uploads in
    flight both would pass and the queue would hold two.)
    """
    data = tmp_path / "data"
    clip = three_s_clip.read_bytes()
    with one_job_running(tmp_path, paced_profiles, three_s_clip) as (server, first):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as arriving:
            arriving.sendall(
                f"PUT /jobs?profile={PACED_PROFILE} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(clip)}\r\nConnection: close\r\n\r\n".encode()
                + clip[:1000]
            )
            # The server has the first bytes: this upload is in flight.
            deadline = time.monotonic() + 10
            while not list((data / "uploads").glob("*/input-*")):
                assert time.monotonic() < deadline, "the upload never started"
                time.sleep(0.02)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as second:
                second.sendall(
                    f"PUT /jobs?profile={PACED_PROFILE} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(clip)}\r\nExpect: 100-continue\r\n\r\n".encode()
                )
                answer = _read_response(second)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "queue_full"
            assert b"100 Continue" not in answer
            arriving.sendall(clip[1000:])
            head, _, body = _read_response(arriving).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 201 "), head
        queued = json.loads(body)
        assert queued["state"] == "queued"
        jobs = get_json(server.url + "/jobs")["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted([first["id"], queued["id"]])


def test_a_refused_upload_no_longer_holds_a_queue_place(
    tmp_path: Path, paced_profiles: Path, three_s_clip: Path
) -> None:
    """
    An upload refused mid-body (413 here) holds no queue place while its
    connection lingers: with --workers 1 --max-queued 1 and one job running,
    the next upload is queued, not refused with 503.
    """
    limit = ("--max-upload-size", "1M")
    with one_job_running(tmp_path, paced_profiles, three_s_clip, *limit) as (server, _):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as refused:
            refused.sendall(
                f"PUT /jobs?profile={PACED_PROFILE} HTTP/1.1\r\nHost: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            chunk = b"%x\r\n" % (256 << 10) + bytes(256 << 10) + b"\r\n"
            refused.sendall(chunk * 5)
            answer = refused.recv(65536)
            assert answer.startswith(b"HTTP/1.1 413 "), answer
            # The refused connection is still open (lingering) when the next upload comes.
            second = upload(server.url, three_s_clip, PACED_PROFILE)
        assert second["state"] == "queued"


def _stored_jobs(data_dir: Path) -> dict[str, Job]:
    """The jobs as the stopped server left them in its database."""
    with sqlite3.connect(f"file:{data_dir / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT record FROM jobs").fetchall()
    jobs = (Job.from_record(json.loads(record)) for (record,) in rows)
    return {job.id: job for job in jobs}


def test_sigterm_stops_encoders_and_requeues(
    tmp_path: Path, paced_profiles: Path, three_s_clip: Path
) -> None:
    """
    `transcoder serve` stopped with SIGTERM while two encoders run exits
    cleanly with no encoder left (not even a zombie); its jobs are stored
    back as queued, and the next start runs them to valid results.
    """
    data = tmp_path / "data"
    extra = ("--profiles", str(paced_profiles), "--workers", "2")
    server = serve(data, tmp_path / "first.log", *extra)
    try:
        ids = [upload(server.url, three_s_clip, PACED_PROFILE)["id"] for _ in range(2)]
        for job_id in ids:
            wait_job(server.url, job_id, lambda j: j["progress"] > 0)
        running = encoders(data)
        assert sorted(cwd.name for cwd in running.values()) == sorted(ids)
        assert server.stop(signal.SIGTERM) == 0, server.log_text()
    finally:
        server.kill()
    assert "Traceback" not in server.log_text()
    assert encoders(data) == {}
    for pid in running:
        assert not alive(pid)
        assert not Path(f"/proc/{pid}").exists(), "the server left a zombie"

    stored = _stored_jobs(data)
    for job_id in ids:
        job = stored[job_id]
        assert (job.state.value, job.pid, job.progress, job.started_at) == ("queued", None, 0, None)
        assert not list((data / "jobs" / job_id).glob("result*"))

    second = serve(data, tmp_path / "second.log", *extra)
    try:
        for job_id in ids:
            check_result(second.url, wait_job(second.url, job_id, finished), tmp_path, 3)
    finally:
        second.stop()
    assert encoders(data) == {}

"""
Several real `transcoder serve` nodes on loopback sharing one PostgreSQL
database and one data dir (issue 16): uploads taken by an ingest-only node
run on encoder nodes, every node shows every job, each job runs once, and a
live node's name is refused.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serverproc import ServerProcess, serve, transcoder, wait_for

if TYPE_CHECKING:
    from conftest import Clips

# Short, so that the tests spend little time waiting on leases.
LEASE = "2s"
FINISHED = ("succeeded", "failed", "cancelled")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def node(data: Path, log: Path, dsn: str, name: str, workers: int) -> ServerProcess:
    return serve(data, log, "--store", dsn, "--node-name", name, "--workers", str(workers),
                 "--lease", LEASE)  # fmt: skip


def upload(server: ServerProcess, clips: Clips) -> str:
    r = subprocess.run(
        ["curl", "-sS", "-F", "profile=mux-avi", "-F", f"video=@{clips.flv_video}",
         "-F", f"audio=@{clips.mp3_audio}", f"{server.url}/jobs"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    job_id: str = json.loads(r.stdout)["id"]
    return job_id


def finished(server: ServerProcess, job_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    job = _get(f"{server.url}/jobs/{job_id}")
    while job["state"] not in FINISHED:
        assert time.monotonic() < deadline, job
        job = _get(f"{server.url}/jobs/{job_id}?wait=10")
    return job


def test_three_nodes_share_the_work(tmp_path: Path, clips: Clips, pg_dsn: str) -> None:
    """An upload to a --workers 0 node runs on an encoder node and every node shows it the same; ten jobs sent to all three nodes each run exactly once (attempt 1), on both encoder nodes; GET /nodes lists the three; a fourth node under a live node's name is refused and exits 1."""
    data = tmp_path / "data"
    names = ("ingest", "enc-1", "enc-2")
    servers: list[ServerProcess] = []
    try:
        for name, workers in zip(names, (0, 1, 1), strict=True):
            servers.append(node(data, tmp_path / f"{name}.log", pg_dsn, name, workers))
        ingest, enc1, enc2 = servers

        job_id = upload(ingest, clips)
        job = finished(ingest, job_id)
        assert job["state"] == "succeeded", job
        assert job["node"] in ("enc-1", "enc-2") and job["attempt"] == 1
        for server in servers:
            url = f"{server.url}/jobs/{job_id}"
            assert wait_for(lambda url=url: _get(url) == job, timeout=2.0), _get(url)
        with urllib.request.urlopen(f"{ingest.url}{job['output']['result_url']}") as r:
            assert len(r.read()) == job["output"]["size"]

        listed = _get(f"{enc1.url}/nodes")["nodes"]
        assert [(n["name"], n["workers"]) for n in listed] == [
            ("enc-1", 1),
            ("enc-2", 1),
            ("ingest", 0),
        ]

        ids = [upload(servers[i % 3], clips) for i in range(10)]
        jobs = [finished(servers[(i + 1) % 3], job_id) for i, job_id in enumerate(ids)]
        assert all(j["state"] == "succeeded" and j["attempt"] == 1 for j in jobs), jobs
        assert {j["node"] for j in jobs} == {"enc-1", "enc-2"}

        # Every node hears of another's changes within about a second (NOTIFY).
        def listed_on_enc2() -> set[str]:
            return {j["id"] for j in _get(f"{enc2.url}/jobs?state=succeeded")["jobs"]}

        assert wait_for(lambda: listed_on_enc2() == {job_id, *ids}, timeout=2.0), listed_on_enc2()

        again = subprocess.run(
            [transcoder(), "serve", "--listen", "tcp:0:interface=127.0.0.1", "--data-dir",
             str(data), "--store", pg_dsn, "--node-name", "enc-1", "--lease", LEASE],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert again.returncode == 1, again.stdout + again.stderr
        assert "a live node named 'enc-1'" in again.stdout + again.stderr
    finally:
        for server in servers:
            server.stop()


def _noisy_clip(path: Path, seconds: int) -> Path:
    # Noise makes x264 work hard: a few seconds of encode at preset=slow.
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
         f"nullsrc=size=640x360:rate=25:duration={seconds},geq=random(1)*255:128:128",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         "-c:v", "mpeg4", "-q:v", "2", "-c:a", "mp3", "-shortest", str(path)],
        check=True, timeout=120,
    )  # fmt: skip
    return path


def _gone_within(pgid: int, seconds: float) -> bool:
    """Whether no live (non-zombie) process is left in group C{pgid} within C{seconds}."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                alive.append(entry.name)
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_killed_nodes_job_is_taken_over(tmp_path: Path, pg_dsn: str) -> None:
    """kill -9 of the node running a long encode: its encoder is gone within 3 s, and after its lease the other node takes the job over as attempt 2, under its own output name, and it succeeds."""
    import os
    import signal

    import psycopg

    data = tmp_path / "data"
    clip = _noisy_clip(tmp_path / "noisy.avi", 5)
    first = node(data, tmp_path / "first.log", pg_dsn, "first", 1)
    second: ServerProcess | None = None
    orphan: int | None = None
    try:
        r = subprocess.run(
            ["curl", "-sS", "-F", "profile=mp4-h264", "-F", "preset=slow", "-F",
             f"file=@{clip}", f"{first.url}/jobs"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job_id = json.loads(r.stdout)["id"]
        deadline = time.monotonic() + 60
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            while orphan is None:
                assert time.monotonic() < deadline
                row = conn.execute("SELECT record->>'pid' FROM jobs WHERE id = %s", (job_id,))
                pid = row.fetchone()
                orphan = int(pid[0]) if pid and pid[0] else None
                time.sleep(0.1)
        second = node(data, tmp_path / "second.log", pg_dsn, "second", 1)
        first.kill()
        # The encoder dies with its node: a re-run never competes with an orphan.
        assert _gone_within(orphan, 3.0), f"encoder {orphan} outlived its node"
        job = finished(second, job_id, timeout=180)
        assert job["state"] == "succeeded", job
        assert (job["node"], job["attempt"]) == ("second", 2)
        assert (data / "jobs" / job_id / "result.2.mp4").stat().st_size == job["output"]["size"]
    finally:
        if orphan is not None:
            # Only if the assertion above failed: leave nothing running.
            try:
                os.killpg(orphan, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.stop()
        if second is not None:
            second.stop()

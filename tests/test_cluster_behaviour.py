"""
What several real `transcoder serve` nodes on one PostgreSQL and one data
dir do when a job is cancelled, long-polled, taken from a paused node, left
by a killed or a cleanly stopped node, or sent in numbers (issue 16).  Each
test prints the figure it measures (docs/reliability.md, "Several nodes").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from conftest import run_ffmpeg
from serverproc import ServerProcess, serve, wait_for
from test_cluster_nodes import FINISHED, LEASE, _get, _gone_within, finished, upload
from twisted.internet import reactor
from twisted.internet.task import deferLater

from transcoder.core.cluster import ClusterRegistry
from transcoder.core.jobs import InputFile, Job, JobState, OutputFile, new_job_id
from transcoder.core.pgcluster import PostgresClusterStore
from transcoder.core.profiles import Profile
from transcoder.testing import FakeExecutor

if TYPE_CHECKING:
    from conftest import Clips


QUIET_PROFILE = "quiet-h264"
# ffmpeg at the input's own pace, so that a job lasts as long as its clip
# whatever the machine's load, and writing nothing to the node's pipes (no
# progress, no stats): killed without setpriv, its node leaves it running.
_QUIET_TOML = f"""
[{QUIET_PROFILE}]
description = "H.264 in MP4 at the input's pace, printing nothing."
executable = "ffmpeg"
argv = [
    "-nostdin", "-y", "-nostats", "-loglevel", "quiet", "-re", "-i", "{{file}}",
    "-c:v", "libx264", "-preset", "ultrafast", "-an", "-f", "mp4", "{{output}}",
]
output_extension = "mp4"
media_type = "video/mp4"
"""


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s of 320x240 video: a job of 6 s under the quiet profile."""
    path = tmp_path_factory.mktemp("long") / "six.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=6",
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))  # fmt: skip
    return path


def long_job(server: ServerProcess, clip: Path) -> str:
    r = subprocess.run(
        ["curl", "-sS", "-F", f"profile={QUIET_PROFILE}", "-F", f"file=@{clip}",
         f"{server.url}/jobs"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    job_id: str = json.loads(r.stdout)["id"]
    return job_id


def stored(dsn: str, job_id: str) -> tuple[str, str | None, int, int | None] | None:
    """The job's row: state, node, attempt and the recorded encoder pid."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT state, node, attempt, record->>'pid' FROM jobs WHERE id = %s", (job_id,)
        ).fetchone()
    if row is None:
        return None
    return row[0], row[1], int(row[2]), int(row[3]) if row[3] else None


def encoder_group(dsn: str, job_id: str, node_name: str, attempt: int, timeout: float = 60) -> int:
    """
    The process group of the encoder that C{node_name} runs for C{attempt},
    once the encoder itself runs in it (the pid is stored at the spawn,
    before setpriv and setsid have exec'd).
    """
    deadline = time.monotonic() + timeout
    while True:
        row = stored(dsn, job_id)
        if row is not None and row[1:3] == (node_name, attempt) and row[3] is not None:
            pid = row[3]
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                pgid = os.getpgid(pid)
            except OSError:
                comm, pgid = "", 0
            if pgid == pid and comm == "ffmpeg":
                return pid
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


def gone_at(pgid: int, timeout: float) -> float | None:
    """The monotonic time at which group C{pgid} had no live process, or None after C{timeout}."""
    return time.monotonic() if _gone_within(pgid, timeout) else None


def delete(server: ServerProcess, job_id: str) -> int:
    request = urllib.request.Request(f"{server.url}/jobs/{job_id}", method="DELETE")
    with urllib.request.urlopen(request, timeout=60) as r:
        status: int = r.status
        return status


def missing(server: ServerProcess, job_id: str) -> bool:
    try:
        _get(f"{server.url}/jobs/{job_id}")
    except urllib.error.HTTPError as e:
        return e.code == 404
    return False


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def attempt_files(job_dir: Path, attempt: int) -> list[str]:
    return sorted(p.name for p in job_dir.glob(f"result.*{attempt}.*"))


def without_setpriv(tmp_path: Path) -> dict[str, str]:
    """A PATH without setpriv: encoders outlive their node, as with an older release."""
    bin_dir = tmp_path / "bin-without-setpriv"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("ffmpeg", "ffprobe", "mencoder", "setsid"):
        found = shutil.which(tool)
        assert found is not None, tool
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return {"PATH": str(bin_dir)}


class Nodes:
    """The nodes a test started, stopped (and woken, if paused) at its end."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.data = tmp_path / "data"
        self._tmp = tmp_path
        self._dsn = dsn
        self.started: list[ServerProcess] = []
        self.groups: list[int] = []
        self._profiles = tmp_path / "quiet.toml"
        self._profiles.write_text(_QUIET_TOML)

    def start(
        self,
        name: str,
        workers: int,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        log = self._tmp / f"{name}-{len(self.started)}.log"
        server = serve(self.data, log, "--store", self._dsn, "--node-name", name,
                       "--workers", str(workers), "--lease", LEASE,
                       "--profiles", str(self._profiles), env=env)  # fmt: skip
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            if server.proc.poll() is None:
                os.kill(server.pid, signal.SIGCONT)
            server.stop()
        for pgid in self.groups:
            # Only if an assertion failed: leave nothing running.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def nodes(tmp_path: Path, pg_dsn: str) -> Iterator[Nodes]:
    started = Nodes(tmp_path, pg_dsn)
    try:
        yield started
    finally:
        started.close()


# -- end to end ------------------------------------------------------------------


def test_a_cancel_through_one_node_stops_the_encoder_on_another(
    nodes: Nodes, pg_dsn: str, long_clip: Path
) -> None:
    """A DELETE sent to an ingest-only node stops the encoder running on the encoder node within 2 s (figure: seconds from the DELETE to the encoder's process group gone, polled in /proc); the encoder node records the job cancelled, and then it is gone (404) on both nodes with its files."""
    ingest = nodes.start("ingest", 0)
    enc = nodes.start("enc", 1)
    job_id = long_job(ingest, long_clip)
    pgid = encoder_group(pg_dsn, job_id, "enc", 1)
    nodes.groups.append(pgid)

    def follow() -> str:
        # Long-polls on the encoder node until the job ends there.
        state = "running"
        while state not in FINISHED:
            try:
                state = _get(f"{enc.url}/jobs/{job_id}?wait=30")["state"]
            except urllib.error.HTTPError as e:
                return str(e.code)
        return state

    with ThreadPoolExecutor(2) as pool:
        seen = pool.submit(follow)
        start = time.monotonic()
        answer = pool.submit(delete, ingest, job_id)
        gone = gone_at(pgid, 10.0)
        assert gone is not None, "the encoder outlived the cancel"
        print(f"\nencoder gone {gone - start:.3f} s after the DELETE to another node")
        assert gone - start < 2.0
        assert answer.result(timeout=60) == 204
        assert seen.result(timeout=60) == "cancelled"
    for server in (ingest, enc):
        assert wait_for(lambda server=server: missing(server, job_id), timeout=2.0)
    assert not (nodes.data / "jobs" / job_id).exists()
    assert stored(pg_dsn, job_id) is None


def test_a_long_poll_wakes_on_a_change_made_on_another_node(nodes: Nodes, clips: Clips) -> None:
    """A long-poll (?wait=30) on an ingest-only node, waiting when the encoder node records the job's end, returns within about a second of it (figure: seconds from the job's finished_at, stamped by the encoder node, to the answer; the worst of three jobs, asserted under 2 s)."""
    ingest = nodes.start("ingest", 0)
    nodes.start("enc", 1)
    latencies = []
    for _ in range(3):
        job_id = upload(ingest, clips)
        job = _get(f"{ingest.url}/jobs/{job_id}")
        while job["state"] not in FINISHED:
            sent = time.time()
            job = _get(f"{ingest.url}/jobs/{job_id}?wait=30")
            answered = time.time()
        assert job["state"] == "succeeded" and job["node"] == "enc", job
        # Only a long-poll that was waiting when the change was made measures the wake-up.
        if sent < epoch(job["finished_at"]):
            latencies.append(round(answered - epoch(job["finished_at"]), 3))
    print(f"\nlong-poll answered {max(latencies):.3f} s (worst of {latencies}) after the change")
    assert latencies and max(latencies) < 2.0


def test_a_paused_node_cannot_overwrite_the_next_attempt(
    nodes: Nodes, pg_dsn: str, long_clip: Path
) -> None:
    """A node paused (SIGSTOP, the node alone: its encoder runs on) past its lease loses the job to the other node (attempt 2); woken (SIGCONT), its writes are refused (LostJob) and it stops its own encoder, having lost the job or gone half a lease without a renewal (figure: seconds from SIGCONT to its encoder's group gone) and removes attempt 1's files, and the job ends as attempt 2 made it, the same on both nodes."""
    first = nodes.start("first", 1)
    job_id = long_job(first, long_clip)
    old = encoder_group(pg_dsn, job_id, "first", 1)
    nodes.groups.append(old)
    second = nodes.start("second", 1)

    os.kill(first.pid, signal.SIGSTOP)
    paused = time.monotonic()
    new = encoder_group(pg_dsn, job_id, "second", 2, timeout=30)
    nodes.groups.append(new)
    taken = time.monotonic() - paused
    assert Path(f"/proc/{old}").exists(), "attempt 1's encoder ended during the pause"
    os.kill(first.pid, signal.SIGCONT)
    woken = time.monotonic()
    gone = gone_at(old, 10.0)
    assert gone is not None, "the woken node left its encoder running"
    print(f"\ntaken over {taken:.3f} s after the pause; the woken node's encoder gone "
          f"{gone - woken:.3f} s after SIGCONT")  # fmt: skip

    job = finished(second, job_id, timeout=120)
    assert job["state"] == "succeeded", job
    assert (job["node"], job["attempt"]) == ("second", 2)
    job_dir = nodes.data / "jobs" / job_id
    assert (job_dir / "result.2.mp4").stat().st_size == job["output"]["size"]
    assert job["output"]["duration"] == pytest.approx(6, abs=0.5)
    assert wait_for(lambda: attempt_files(job_dir, 1) == [], timeout=5.0), attempt_files(job_dir, 1)
    assert sorted(p.name for p in job_dir.glob("result.*")) == ["result.2.mp4"]
    assert wait_for(lambda: _get(f"{first.url}/jobs/{job_id}") == job, timeout=2.0)
    assert stored(pg_dsn, job_id) == ("succeeded", "second", 2, None)
    # Woken, the node stops its encoder for whichever it notices first: the job
    # taken from it, or its own renewals unanswered for half a lease.
    assert any(
        why in first.output
        for why in (
            "is no longer this node's",
            "was taken from this node",
            "stopping its encoder, the job database cannot be reached",
        )
    ), first.output


def test_a_killed_node_restarts_and_claims_again(
    nodes: Nodes, pg_dsn: str, clips: Clips, tmp_path: Path
) -> None:
    """A node killed with kill -9 (run without setpriv, its encoder printing nothing, so the encoder outlives it) restarts under the same name: it stops its leftover encoder before it claims anything or answers (figure: seconds from the restart to the node answering, the leftover gone by then), claims its job again as attempt 2, and runs a new job."""
    enc = nodes.start("enc", 1, env=without_setpriv(tmp_path))
    job_id = long_job(enc, clips.av_long)
    leftover = encoder_group(pg_dsn, job_id, "enc", 1)
    nodes.groups.append(leftover)
    enc.kill()
    assert not _gone_within(leftover, 0.5), "the encoder died with its node: nothing to recover"

    restarted = time.monotonic()
    again = nodes.start("enc", 1)
    # Recovery runs before the node claims or listens: once it answers, the leftover is gone.
    assert _gone_within(leftover, 0.0), "the restarted node left its leftover encoder running"
    assert f"stopping leftover encoder {leftover}" in again.output
    print(f"\nleftover encoder gone, node answering {time.monotonic() - restarted:.3f} s "
          "after the restart began")  # fmt: skip
    new = encoder_group(pg_dsn, job_id, "enc", 2)
    nodes.groups.append(new)
    assert delete(again, job_id) == 204

    short = upload(again, clips)
    job = finished(again, short)
    assert (job["state"], job["node"], job["attempt"]) == ("succeeded", "enc", 1), job


def test_thirty_jobs_on_three_nodes_each_run_once(nodes: Nodes, clips: Clips) -> None:
    """30 short mux-avi jobs sent round-robin to three nodes (one --workers 0, two with 1 worker) each run exactly once (attempt 1, one result file, result.1.avi), and both encoder nodes ran some (figure: the jobs each encoder node ran, and the seconds from the first upload to the last end)."""
    servers = [nodes.start("ingest", 0), nodes.start("enc-1", 1), nodes.start("enc-2", 1)]
    began = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(lambda i: upload(servers[i % 3], clips), range(30)))
        jobs = list(pool.map(lambda i: finished(servers[(i + 1) % 3], ids[i]), range(30)))
    took = time.monotonic() - began
    assert all(j["state"] == "succeeded" and j["attempt"] == 1 for j in jobs), jobs
    for j in jobs:
        assert sorted(p.name for p in (nodes.data / "jobs" / j["id"]).glob("result.*")) == [
            "result.1.avi"
        ]
    ran = {name: sum(j["node"] == name for j in jobs) for name in ("enc-1", "enc-2")}
    print(f"\n30 jobs in {took:.1f} s, run by {ran}")
    assert all(ran.values()), ran


def test_a_clean_stop_gives_the_job_back_without_an_attempt(
    nodes: Nodes, pg_dsn: str, long_clip: Path
) -> None:
    """SIGTERM of the node running a job stops its encoder, removes its partial output and puts the job back in the queue without using up an attempt (figure: the attempt stored after the stop, 0, and the attempt of the next claim, 1), so clean restarts never count toward --max-attempts."""
    enc = nodes.start("enc", 1)
    job_id = long_job(enc, long_clip)
    pgid = encoder_group(pg_dsn, job_id, "enc", 1)
    nodes.groups.append(pgid)
    assert enc.stop() == 0
    assert _gone_within(pgid, 0.0)
    assert stored(pg_dsn, job_id) == ("queued", None, 0, None)
    assert list((nodes.data / "jobs" / job_id).glob("result.*")) == []

    again = nodes.start("enc", 1)
    nodes.groups.append(encoder_group(pg_dsn, job_id, "enc", 1))
    job = _get(f"{again.url}/jobs/{job_id}")
    print(f"\nafter a clean stop: stored attempt 0, next claim attempt {job['attempt']}")
    assert (job["state"], job["attempt"]) == ("running", 1)
    assert delete(again, job_id) == 204


# -- in process: a node that lost its job ---------------------------------------

COPY = Profile(
    name="copy",
    description="test profile",
    executable="true",
    argv=("{file}", "{output}"),
    output_extension="avi",
    timeout=None,
)


def _output(name: str) -> OutputFile:
    return OutputFile(size=1, sha256="0" * 64, media_type="video/x-msvideo", path=name)


# Node b takes the job over, as a claim after an expired lease would, and holds it.
TAKEOVER = (
    "UPDATE jobs SET node = 'b', attempt = 2, lease_expires_at = now() + interval '1 hour'"
    " WHERE id = %s"
)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_node_that_lost_its_job_removes_its_attempts_files(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A node whose job was taken over (here: the row handed to node b, attempt 2, by SQL) removes the files its own attempt wrote, result.1.avi and result.partial.1.avi, and keeps attempt 2's: whether it learns of the loss first (the NOTIFY stops its encoder, which had already finished) or from its refused record of the end (LostJob). Figure: files of attempt 1 left, 0."""
    import psycopg

    store = PostgresClusterStore(pg_dsn, reactor)
    executor = FakeExecutor()
    registry = ClusterRegistry(
        reactor, store, tmp_path, {"copy": COPY}, workers=2, executor=executor,
        node="a", lease=2.0, max_attempts=3,
    )  # fmt: skip
    registry.register(2)
    registry.start()
    try:
        jobs = []
        for _ in range(2):
            job = Job(
                new_job_id(), "copy", {}, [InputFile("file", "in.avi", 1, "00" * 32, "in.avi")]
            )
            registry.job_dir(job.id).mkdir(parents=True)
            await registry.add(job)
            jobs.append(job)
        await _until(lambda: len(executor.executions) == 2)
        by_id = {e.job_id: e for e in executor.executions}
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for n, job in enumerate(jobs):
                run = by_id[job.id]
                assert run.kwargs["attempt"] == 1
                job_dir = registry.job_dir(job.id)
                for name in ("result.1.avi", "result.partial.1.avi", "result.2.avi"):
                    (job_dir / name).write_bytes(b"x")
                conn.execute(TAKEOVER, (job.id,))
                if n == 0:
                    # Learnt from the notification: its cancel comes too late.
                    await _until(lambda run=run: run.cancels == 1)
                # Else learnt from the refused record of the end, in this very turn.
                run.finish(JobState.SUCCEEDED, output=_output("result.1.avi"))
        for job in jobs:
            job_dir = registry.job_dir(job.id)
            await _until(lambda job_dir=job_dir: attempt_files(job_dir, 1) == [])
            assert sorted(p.name for p in job_dir.glob("result.*")) == ["result.2.avi"]
            await _until(lambda job=job: (job.node, job.attempt) == ("b", 2))
    finally:
        for left in executor.running():
            # Only if an assertion failed: stop() waits for every run.
            left.finish(JobState.CANCELLED)
        await registry.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_that_lost_its_job_kills_its_encoder_at_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A node that learns it lost a running job (the row handed to node b by SQL) kills its encoder's process group with SIGKILL at once, without the TERM and --kill-grace (5 s) a cancel gets: the output is thrown away, and the encoder would only take CPU from the attempt that replaced it.  Here the encoder is a process group that nothing else stops (figure: seconds from the takeover to the group gone)."""
    import psycopg

    store = PostgresClusterStore(pg_dsn, reactor)
    executor = FakeExecutor()
    registry = ClusterRegistry(
        reactor, store, tmp_path, {"copy": COPY}, workers=1, executor=executor,
        node="a", lease=2.0, max_attempts=3,
    )  # fmt: skip
    registry.register(1)
    registry.start()
    encoder = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; sleep 60 & wait"], start_new_session=True
    )
    try:
        job = Job(new_job_id(), "copy", {}, [InputFile("file", "in.avi", 1, "00" * 32, "in.avi")])
        registry.job_dir(job.id).mkdir(parents=True)
        await registry.add(job)
        await _until(lambda: len(executor.executions) == 1)
        run = executor.executions[0]
        run.spawn(encoder.pid)
        await _until(lambda: stored(pg_dsn, job.id) == ("running", "a", 1, encoder.pid))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(TAKEOVER, (job.id,))
        taken = time.monotonic()
        # A fake execution: nothing but the registry's own kill stops the group.
        await _until(lambda: encoder.poll() is not None, timeout=4.0)
        print(f"\nthe lost run's encoder gone {time.monotonic() - taken:.3f} s after the takeover")
        assert encoder.returncode == -signal.SIGKILL
        run.finish(JobState.CANCELLED)
    finally:
        if encoder.poll() is None:
            os.killpg(encoder.pid, signal.SIGKILL)
            encoder.wait()
        for left in executor.running():
            # Only if an assertion failed: stop() waits for every run.
            left.finish(JobState.CANCELLED)
        await registry.stop()


@pytest_twisted.ensureDeferred
async def test_a_read_from_before_the_claim_does_not_take_the_job(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A copy of the row read before this node's claim (the upload's notification, answered after the claim) does not count as the job taken from this node: the run goes on and the job succeeds once, as attempt 1.  Before, the node stopped its own run, its lease expired, and the job ran again as attempt 2 (seen in test_a_killed_node_restarts_and_claims_again)."""
    store = PostgresClusterStore(pg_dsn, reactor)
    executor = FakeExecutor()
    registry = ClusterRegistry(
        reactor, store, tmp_path, {"copy": COPY}, workers=1, executor=executor,
        node="a", lease=2.0, max_attempts=3,
    )  # fmt: skip
    registry.register(1)
    registry.start()
    try:
        job = Job(new_job_id(), "copy", {}, [InputFile("file", "in.avi", 1, "00" * 32, "in.avi")])
        registry.job_dir(job.id).mkdir(parents=True)
        before = Job.from_record(job.to_record())
        await registry.add(job)
        await _until(lambda: len(executor.executions) == 1)
        run = executor.executions[0]
        # The row as stored by the upload.
        before.seq = job.seq
        registry._apply(job.id, (before, False))
        assert run.cancels == 0
        run.finish(JobState.SUCCEEDED, output=_output("result.1.avi"))
        await _until(lambda: stored(pg_dsn, job.id) == ("succeeded", "a", 1, None))
        assert len(executor.executions) == 1
    finally:
        for left in executor.running():
            left.finish(JobState.CANCELLED)
        await registry.stop()

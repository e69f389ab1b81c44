"""Tests for L{transcoder.core.registry}: scheduling, state, persistence and recovery of jobs."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater

from transcoder.core.errors import Unavailable
from transcoder.core.jobs import InputFile, Job, JobState, OutputFile, new_job_id
from transcoder.core.profiles import Profile, builtin_profiles
from transcoder.core.registry import PROGRESS_SAVE_INTERVAL, JobRegistry
from transcoder.core.sqlite import SQLiteJobStore
from transcoder.testing import FakeExecutor, MemoryStore

PROFILE = Profile(
    name="copy",
    description="test profile",
    executable="true",
    argv=("{file}", "{output}"),
    output_extension="avi",
    timeout=None,
)
TIMED = Profile(
    name="timed",
    description="test profile with its own time limit",
    executable="true",
    argv=("{file}", "{output}"),
    timeout=42.0,
)
PROFILES = {p.name: p for p in (PROFILE, TIMED)}


@dataclass
class Env:
    clock: Clock
    store: MemoryStore
    executor: FakeExecutor
    registry: JobRegistry
    data_dir: Path


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    def make(
        workers: int = 1, stored: list[Job] | None = None, start: bool = True, **kw: Any
    ) -> Env:
        clock = Clock()
        clock.advance(1_700_000_000)
        store = MemoryStore(stored)
        executor = FakeExecutor()
        registry = JobRegistry(
            clock, store, tmp_path, PROFILES, workers=workers, executor=executor, **kw
        )
        if start:
            registry.start()
        return Env(clock, store, executor, registry, tmp_path)

    yield make


def new_job(profile: str = "copy", **kw: Any) -> Job:
    return Job(
        id=new_job_id(),
        profile=profile,
        params={"q": 3},
        inputs=[InputFile("file", "clip.mov", 3, "00" * 32, "input/file.mov")],
        **kw,
    )


def on_disk(registry: JobRegistry, job: Job) -> Job:
    """Write the job's directory as the upload code would before add()."""
    d = registry.job_dir(job.id)
    (d / "input").mkdir(parents=True)
    (d / "input" / "file.mov").write_bytes(b"abc")
    return job


def add(env: Env, profile: str = "copy", **kw: Any) -> Job:
    d = env.registry.add(on_disk(env.registry, new_job(profile, **kw)))
    assert d.called
    job: Job = d.result
    return job


def test_job_dir_and_uploads_dir(make_env: Callable[..., Env]) -> None:
    """Job directories live under data_dir/jobs, uploads under data_dir/uploads; ids are checked."""
    env = make_env()
    job_id = new_job_id()
    assert env.registry.job_dir(job_id) == env.data_dir / "jobs" / job_id
    assert env.registry.uploads_dir == env.data_dir / "uploads"
    with pytest.raises(ValueError):
        env.registry.job_dir("../etc")


def test_add_numbers_stores_and_starts(make_env: Callable[..., Env]) -> None:
    """add() gives increasing seq and the clock's time, stores the job, and starts it."""
    env = make_env(workers=1)
    first = add(env)
    env.clock.advance(5)
    second = add(env)
    assert second.seq > first.seq
    assert first.created_at == 1_700_000_000
    assert second.created_at == 1_700_000_005
    assert env.store.rows[second.id]["state"] == "queued"
    assert env.registry.get(first.id) is first
    assert first.state is JobState.RUNNING
    assert env.store.rows[first.id]["state"] == "running"
    assert second.state is JobState.QUEUED
    assert (env.registry.running_count, env.registry.queued_count) == (1, 1)


def test_executor_arguments(make_env: Callable[..., Env]) -> None:
    """The executor gets the job's dir, profile, absolute inputs, params and time limit."""
    env = make_env(workers=2, job_timeout=7.0, kill_grace=1.5)
    plain = add(env, "copy")
    timed = add(env, "timed")
    by_id = {e.job_id: e.kwargs for e in env.executor.executions}
    kw = by_id[plain.id]
    job_dir = env.registry.job_dir(plain.id)
    assert kw["job_dir"] == job_dir
    assert kw["profile"] is PROFILE
    assert kw["inputs"] == {"file": job_dir / "input" / "file.mov"}
    assert kw["params"] == {"q": 3}
    assert kw["timeout"] == 7.0
    assert kw["kill_grace"] == 1.5
    # A profile's own limit wins over the server-wide one.
    assert by_id[timed.id]["timeout"] == TIMED.timeout


def test_fifo(make_env: Callable[..., Env]) -> None:
    """Jobs start in the order they were added; jobs() lists the newest first."""
    env = make_env(workers=1)
    jobs = [add(env) for _ in range(6)]
    while env.executor.running():
        env.executor.running()[0].finish()
    assert env.executor.started_ids == [j.id for j in jobs]
    assert [j.id for j in env.registry.jobs()] == [j.id for j in reversed(jobs)]


def test_concurrency_cap(make_env: Callable[..., Env]) -> None:
    """With 20 jobs and 2 workers, exactly 2 run at once until the queue drains; each runs once."""
    env = make_env(workers=2)
    jobs = [add(env) for _ in range(20)]
    rnd = random.Random(1234)
    while env.executor.running():
        running = env.executor.running()
        assert len(running) == min(2, 20 - len(env.executor.executions) + len(running))
        assert env.registry.running_count == len(running)
        rnd.choice(running).finish()
    assert env.executor.most_active == 2
    assert sorted(env.executor.started_ids) == sorted(j.id for j in jobs)
    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    assert env.registry.running_count == env.registry.queued_count == 0


def test_outcomes_recorded(make_env: Callable[..., Env]) -> None:
    """A success records its output and timing; a failure its exit code, error and log."""
    env = make_env(workers=2)
    good, bad = add(env), add(env)
    ok, ko = env.executor.executions
    assert good.started_at == env.clock.seconds()
    env.clock.advance(12)
    output = OutputFile(10, "ee" * 32, "video/x-msvideo", "result.avi", 3.0)
    ok.progress(40.0)
    ok.finish(JobState.SUCCEEDED, output=output, exit_code=0)
    ko.finish(JobState.FAILED, exit_code=1, error="Cannot open demuxer", log_tail="...\nboom\n")
    assert good.state is JobState.SUCCEEDED
    assert good.output == output
    assert good.progress == 100.0
    assert good.finished_at == good.started_at + 12  # type: ignore[operator]
    assert bad.state is JobState.FAILED
    assert (bad.exit_code, bad.error, bad.log_tail) == (1, "Cannot open demuxer", "...\nboom\n")
    assert env.store.rows[good.id]["output"]["sha256"] == "ee" * 32
    assert env.store.rows[bad.id]["state"] == "failed"


def test_queue_cap_counts_uploads_that_will_wait(make_env: Callable[..., Env]) -> None:
    """
    Uploads still arriving count against max_queued, less those a free
    worker will take at once: uploads at the same time cannot all pass.
    """
    env = make_env(workers=2, max_queued=1)
    env.registry.check_capacity(arriving=2)  # both will find a worker
    with pytest.raises(Unavailable) as e:
        env.registry.check_capacity(arriving=3)  # the third would wait
    assert e.value.code == "queue_full"
    add(env)
    add(env)
    assert env.registry.running_count == 2
    env.registry.check_capacity()
    with pytest.raises(Unavailable):
        env.registry.check_capacity(arriving=1)


def test_queue_cap(make_env: Callable[..., Env]) -> None:
    """With max_queued jobs waiting, check_capacity refuses as unavailable, with a time to retry after."""
    env = make_env(workers=1, max_queued=2)
    add(env)
    env.registry.check_capacity()
    add(env)
    add(env)
    assert env.registry.queued_count == 2
    with pytest.raises(Unavailable) as e:
        env.registry.check_capacity()
    assert e.value.code == "queue_full"
    assert e.value.retry_after > 0
    env.clock.advance(40)
    env.executor.running()[0].finish()
    env.registry.check_capacity()
    add(env)
    with pytest.raises(Unavailable) as e:
        env.registry.check_capacity()
    # Measured from the one run so far: 40 s on one worker.
    assert e.value.retry_after == 40


def test_cancel_queued(make_env: Callable[..., Env]) -> None:
    """A cancelled queued job leaves the queue at once and never runs."""
    env = make_env(workers=1)
    first, second = add(env), add(env)
    d = env.registry.cancel(second.id)
    assert d.called and d.result is second
    assert second.state is JobState.CANCELLED
    assert second.finished_at == env.clock.seconds()
    assert env.store.rows[second.id]["state"] == "cancelled"
    assert env.registry.queued_count == 0
    env.executor.running()[0].finish()
    assert env.executor.started_ids == [first.id]


def test_cancel_running_waits_for_the_encoder(make_env: Callable[..., Env]) -> None:
    """Cancelling a running job stops its encoder; the answer comes once it has ended."""
    env = make_env(workers=1)
    job, waiting = add(env), add(env)
    execution = env.executor.executions[0]
    execution.spawn(777)
    d = env.registry.cancel(job.id)
    again = env.registry.cancel(job.id)
    assert execution.cancels == 1
    assert not d.called and not again.called
    assert job.state is JobState.RUNNING
    # A killed encoder may well look like a failure to the runner.
    execution.finish(JobState.FAILED, exit_code=-15, error="killed")
    assert d.called and d.result is job
    assert again.called and again.result is job
    assert job.state is JobState.CANCELLED
    assert job.pid is None
    assert env.store.rows[job.id]["state"] == "cancelled"
    assert env.executor.started_ids == [job.id, waiting.id]


def test_cancel_while_the_encoder_starts(make_env: Callable[..., Env]) -> None:
    """A cancel made before the executor has returned still reaches the encoder."""
    env = make_env(workers=1)
    answers: list[Deferred[Job | None]] = []

    def cancel_on_start(job: Job) -> None:
        if job.state is JobState.RUNNING and not answers:
            answers.append(env.registry.cancel(job.id))

    env.registry.subscribe(cancel_on_start)
    job = add(env)
    [execution] = env.executor.executions
    assert execution.cancels == 1
    execution.finish(JobState.CANCELLED)
    assert answers[0].result is job and job.state is JobState.CANCELLED


def test_cancel_finished_or_unknown(make_env: Callable[..., Env]) -> None:
    """Cancelling a finished job leaves it unchanged; an unknown id gives None."""
    env = make_env()
    job = add(env)
    env.executor.executions[0].finish(JobState.SUCCEEDED, exit_code=0)
    saves = len(env.store.saves)
    d = env.registry.cancel(job.id)
    assert d.result is job and job.state is JobState.SUCCEEDED
    assert len(env.store.saves) == saves
    assert env.registry.cancel(new_job_id()).result is None


def test_delete(make_env: Callable[..., Env]) -> None:
    """delete() cancels a running job, then removes its directory and stored record."""
    env = make_env(workers=1)
    running, done = add(env), add(env)
    env.executor.executions[0].finish()
    env.executor.executions[1].progress(5)
    assert running.state is JobState.SUCCEEDED and done.state is JobState.RUNNING
    running, done = done, running

    d = env.registry.delete(done.id)
    assert d.result is True
    assert not env.registry.job_dir(done.id).exists()
    assert done.id not in env.store.rows
    assert env.registry.get(done.id) is None

    d = env.registry.delete(running.id)
    assert not d.called
    assert env.executor.executions[1].cancels == 1
    env.executor.executions[1].finish(JobState.CANCELLED)
    assert d.result is True
    assert not env.registry.job_dir(running.id).exists()
    assert env.store.rows == {}
    assert env.registry.jobs() == []
    assert env.registry.delete(running.id).result is False


def test_changed_fires_on_progress_and_state(make_env: Callable[..., Env]) -> None:
    """changed() fires at the job's next progress or state change, with the job."""
    env = make_env()
    job = add(env)
    execution = env.executor.executions[0]
    d = env.registry.changed(job.id)
    assert not d.called
    execution.progress(12.5)
    assert d.called and d.result is job and job.progress == 12.5
    d = env.registry.changed(job.id)
    execution.progress(12.5)  # no change, no wake-up
    assert not d.called
    execution.finish()
    assert d.called and d.result.state is JobState.SUCCEEDED
    e = env.registry.changed(new_job_id())
    assert isinstance(e.result.value, KeyError)
    e.addErrback(lambda f: None)


def test_a_running_job_never_shows_100(make_env: Callable[..., Env]) -> None:
    """An executor's report of 100 (its last, before the job's end) shows as 99.9 while the job runs; 100 comes with succeeded, so a long-poll never sees 100 and running."""
    env = make_env()
    job = add(env)
    execution = env.executor.executions[0]
    d = env.registry.changed(job.id)
    execution.progress(100.0)
    assert d.called
    assert (d.result.state, d.result.progress) == (JobState.RUNNING, 99.9)
    execution.finish()
    assert (job.state, job.progress) == (JobState.SUCCEEDED, 100.0)


def test_changed_cancelled_is_forgotten(make_env: Callable[..., Env]) -> None:
    """A cancelled changed() Deferred fails with CancelledError and is no longer kept."""
    env = make_env()
    job = add(env)
    d = env.registry.changed(job.id)
    kept = env.registry.changed(job.id)
    d.cancel()
    assert isinstance(d.result.value, CancelledError)
    d.addErrback(lambda f: None)
    assert env.registry._events.waiters[job.id] == [kept]
    kept.cancel()
    kept.addErrback(lambda f: None)
    # Nothing is left behind for a job whose waiters all gave up.
    assert job.id not in env.registry._events.waiters
    env.executor.executions[0].progress(50)
    assert job.progress == 50


def test_subscribe(make_env: Callable[..., Env]) -> None:
    """Subscribers see every change of every job until they unsubscribe."""
    env = make_env(workers=1)
    seen: list[tuple[str, JobState, float]] = []
    unsubscribe = env.registry.subscribe(lambda j: seen.append((j.id, j.state, j.progress)))
    job = add(env)
    env.executor.executions[0].progress(30)
    env.executor.executions[0].finish()
    assert seen == [
        (job.id, JobState.QUEUED, 0.0),
        (job.id, JobState.RUNNING, 0.0),
        (job.id, JobState.RUNNING, 30.0),
        (job.id, JobState.SUCCEEDED, 100.0),
    ]
    unsubscribe()
    unsubscribe()
    add(env)
    assert len(seen) == 4


def test_failing_subscriber_does_not_stop_scheduling(make_env: Callable[..., Env]) -> None:
    """An exception in a subscriber is logged; jobs still start and finish."""
    env = make_env(workers=1)

    def broken(job: Job) -> None:
        raise RuntimeError("subscriber bug")

    env.registry.subscribe(broken)
    jobs = [add(env) for _ in range(3)]
    while env.executor.running():
        env.executor.running()[0].finish()
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3


def test_progress_saves_are_throttled(make_env: Callable[..., Env]) -> None:
    """Progress is in memory at once but stored about once a second; state changes always."""
    env = make_env()
    job = add(env)
    execution = env.executor.executions[0]
    before = len(env.store.saves_of(job.id))
    steps = 50
    for i in range(1, steps + 1):
        execution.progress(i)
        assert job.progress == i
        env.clock.advance(0.1)
    progress_saves = env.store.saves_of(job.id)[before:]
    elapsed = steps * 0.1
    assert len(progress_saves) <= elapsed / PROGRESS_SAVE_INTERVAL + 1
    assert len(progress_saves) >= elapsed / PROGRESS_SAVE_INTERVAL - 1
    # The last value reaches the store once the interval has passed.
    env.clock.advance(PROGRESS_SAVE_INTERVAL)
    assert env.store.rows[job.id]["progress"] == steps
    execution.progress(60)
    execution.finish()
    assert env.store.rows[job.id]["state"] == "succeeded"
    saves = len(env.store.saves)
    env.clock.advance(10)
    assert len(env.store.saves) == saves, "no progress write after the end"


def test_spawn_stores_pid(make_env: Callable[..., Env]) -> None:
    """The encoder's pid is stored as soon as it is known and cleared when it ends."""
    env = make_env()
    job = add(env)
    env.executor.executions[0].spawn(4321)
    assert job.pid == 4321
    assert env.store.rows[job.id]["pid"] == 4321
    env.executor.executions[0].finish()
    assert job.pid is None
    assert env.store.rows[job.id]["pid"] is None


def test_missing_profile_fails_the_job(make_env: Callable[..., Env]) -> None:
    """A job naming a profile the server no longer has fails clearly; the next one runs."""
    env = make_env(workers=1)
    orphan, fine = add(env, "gone"), add(env)
    assert orphan.state is JobState.FAILED
    assert orphan.error is not None and "gone" in orphan.error
    assert env.executor.started_ids == [fine.id]


def test_executor_error_fails_the_job(make_env: Callable[..., Env]) -> None:
    """An executor that raises fails that job only; the queue moves on."""
    env = make_env(workers=1)
    env.executor.fail_next = True
    broken, fine = add(env), add(env)
    assert broken.state is JobState.FAILED and broken.error
    assert env.store.rows[broken.id]["state"] == "failed"
    assert env.executor.started_ids == [fine.id]
    assert env.registry.running_count == 1


def test_stop_requeues_running_jobs(make_env: Callable[..., Env]) -> None:
    """stop() stops the encoders, puts their jobs back in the queue, then closes the store."""
    env = make_env(workers=2)
    a, b, c = add(env), add(env), add(env)
    for execution in env.executor.executions:
        execution.spawn(1000)
        execution.progress(50)
    env.registry.stop()
    d = env.registry.stop()
    assert [e.cancels for e in env.executor.executions] == [1, 1]
    assert not d.called and not env.store.closed
    with pytest.raises(Unavailable):
        env.registry.check_capacity()
    for execution in env.executor.executions:
        execution.finish(JobState.CANCELLED)
    assert d.called and env.store.closed
    for job in (a, b):
        assert (job.state, job.progress, job.pid, job.started_at) == (
            JobState.QUEUED,
            0.0,
            None,
            None,
        )
        assert env.store.rows[job.id]["state"] == "queued"
    assert c.state is JobState.QUEUED
    assert len(env.executor.executions) == 2, "nothing starts while stopping"


def stored_job(registry: JobRegistry, seq: int, state: JobState, **kw: Any) -> Job:
    return on_disk(registry, new_job(seq=seq, state=state, created_at=1.0 + seq, **kw))


def test_recovery_cleans_and_resumes(make_env: Callable[..., Env]) -> None:
    """start() removes stray uploads and unowned job dirs and resumes queued jobs in seq order."""
    env = make_env(start=False)
    registry = env.registry
    queued = [stored_job(registry, seq, JobState.QUEUED) for seq in (5, 2, 9)]
    done = stored_job(registry, 3, JobState.SUCCEEDED, progress=100.0, finished_at=9.0)
    (registry.job_dir(done.id) / "result.avi").write_bytes(b"video")
    env.store.rows = {j.id: j.to_record() for j in [*queued, done]}
    orphan = registry.job_dir(new_job_id())
    (orphan / "input").mkdir(parents=True)
    (orphan / "input" / "x").write_bytes(b"x")
    (env.data_dir / "jobs" / "junk.txt").write_text("?")
    (registry.uploads_dir / "half").mkdir(parents=True)
    (registry.uploads_dir / "half" / "part").write_bytes(b"\0" * 10)
    (registry.uploads_dir / "x.upload").write_bytes(b"\0" * 10)

    registry.start()

    assert registry.uploads_dir.is_dir() and list(registry.uploads_dir.iterdir()) == []
    assert sorted(p.name for p in (env.data_dir / "jobs").iterdir()) == sorted(
        j.id for j in [*queued, done]
    )
    assert registry.get(done.id) == done
    assert (registry.job_dir(done.id) / "result.avi").exists()
    while env.executor.running():
        env.executor.running()[0].finish()
    assert env.executor.started_ids == [j.id for j in sorted(queued, key=lambda j: j.seq)]
    assert add(env).seq > 9


def test_recovery_queued_job_without_files_fails(make_env: Callable[..., Env]) -> None:
    """A stored unfinished job whose directory vanished fails instead of running."""
    env = make_env(start=False)
    lost = new_job(seq=1, state=JobState.QUEUED)
    env.store.rows = {lost.id: lost.to_record()}
    env.registry.start()
    job = env.registry.get(lost.id)
    assert job is not None and job.state is JobState.FAILED and job.error
    assert env.executor.executions == []


def _sleeper(cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], cwd=cwd, start_new_session=True)


def test_recovery_stops_leftover_encoder(make_env: Callable[..., Env]) -> None:
    """
    A job stored as running whose encoder still runs gets that encoder's process
    group killed and its partial output removed, and runs again from the start.
    A live pid that belongs to something else is left alone.
    """
    env = make_env(start=False)
    registry = env.registry
    leftover = stored_job(registry, 1, JobState.RUNNING, progress=60.0, started_at=5.0)
    stranger = stored_job(registry, 2, JobState.RUNNING, progress=10.0, started_at=6.0)
    encoder = _sleeper(registry.job_dir(leftover.id))
    other = _sleeper(env.data_dir)
    try:
        leftover.pid = encoder.pid
        stranger.pid = other.pid
        (registry.job_dir(leftover.id) / "result.partial.avi").write_bytes(b"half")
        env.store.rows = {j.id: j.to_record() for j in (leftover, stranger)}

        registry.start()

        # Reaping here proves the process was already dead, not killed later.
        assert encoder.poll() is not None or encoder.wait(timeout=0.5) is not None
        assert encoder.returncode == -signal.SIGTERM
        assert other.poll() is None
        assert not (registry.job_dir(leftover.id) / "result.partial.avi").exists()
        job = registry.get(leftover.id)
        assert job is not None
        assert job.state is JobState.RUNNING, "started again from the queue"
        assert job.progress == 0.0 and job.pid is None
        assert env.executor.started_ids == [leftover.id]
        requeued = [r for r in env.store.saves_of(leftover.id) if r["state"] == "queued"]
        assert requeued and requeued[0]["pid"] is None
    finally:
        for p in (encoder, other):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_recovery_stops_leftover_probes(make_env: Callable[..., Env]) -> None:
    """
    An ffprobe a killed server left on a job's input (in the server's
    directory and process group, found by its file: argument) is killed at
    start-up; a process naming another directory's file is left alone.
    """
    env = make_env(start=False)
    registry = env.registry
    job = stored_job(registry, 1, JobState.RUNNING, started_at=5.0)
    env.store.rows = {job.id: job.to_record()}
    sleep = ["python3", "-c", "import time; time.sleep(60)"]
    probe = subprocess.Popen([*sleep, f"file:{registry.job_dir(job.id)}/input-file.mp4"])
    other = subprocess.Popen([*sleep, f"file:{env.data_dir}/elsewhere.mp4"])
    try:
        registry.start()
        assert probe.wait(timeout=5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (probe, other):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_recovery_with_dead_pid(make_env: Callable[..., Env]) -> None:
    """A stored running job whose encoder is gone is simply queued again."""
    env = make_env(start=False, workers=1)
    gone = subprocess.Popen(["true"])
    gone.wait()
    first = stored_job(env.registry, 1, JobState.QUEUED)
    job = stored_job(env.registry, 2, JobState.RUNNING, pid=gone.pid, progress=3.0)
    env.store.rows = {j.id: j.to_record() for j in (first, job)}
    env.registry.start()
    recovered = env.registry.get(job.id)
    assert recovered is not None
    assert (recovered.state, recovered.progress, recovered.pid) == (JobState.QUEUED, 0.0, None)
    assert env.executor.started_ids == [first.id]


def test_add_not_stored(make_env: Callable[..., Env]) -> None:
    """A job the store refuses is not kept or run, and its directory is removed."""
    env = make_env()
    job = on_disk(env.registry, new_job())

    def refuse(job: Job) -> Deferred[None]:
        raise sqlite3.OperationalError("disk full")

    env.store.save = refuse  # type: ignore[method-assign]
    d = env.registry.add(job)
    assert isinstance(d.result.value, sqlite3.OperationalError)
    d.addErrback(lambda f: None)
    assert env.registry.get(job.id) is None
    assert not env.registry.job_dir(job.id).exists()
    assert env.executor.executions == []


def test_add_requires_a_started_registry(make_env: Callable[..., Env]) -> None:
    """add() before start() or after stop() fails rather than losing the job."""
    env = make_env(start=False)
    d = env.registry.add(on_disk(env.registry, new_job()))
    assert isinstance(d.result.value, RuntimeError)
    d.addErrback(lambda f: None)
    env.registry.start()
    env.registry.stop()
    d = env.registry.add(on_disk(env.registry, new_job()))
    assert isinstance(d.result.value, Unavailable)
    assert d.result.value.code == "shutting_down"
    d.addErrback(lambda f: None)
    assert env.store.rows == {}


@pytest_twisted.ensureDeferred
async def test_with_sqlite_store(tmp_path: Path) -> None:
    """With the real store, a job's life and a stop survive into the next registry."""
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    executor = FakeExecutor()
    registry = JobRegistry(reactor, store, tmp_path, PROFILES, workers=1, executor=executor)
    registry.start()
    done = await registry.add(on_disk(registry, new_job()))
    interrupted = await registry.add(on_disk(registry, new_job()))
    executor.executions[0].finish(JobState.SUCCEEDED, exit_code=0)
    executor.executions[1].spawn(99999999)
    stopped = registry.stop()
    executor.executions[1].finish(JobState.CANCELLED)
    await stopped

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    loaded = {j.id: j for j in store.load()}
    assert loaded[done.id].state is JobState.SUCCEEDED
    assert loaded[interrupted.id].state is JobState.QUEUED
    assert loaded[interrupted.id].pid is None
    executor = FakeExecutor()
    again = JobRegistry(reactor, store, tmp_path, PROFILES, workers=1, executor=executor)
    again.start()
    assert executor.started_ids == [interrupted.id]
    stopped = again.stop()
    executor.executions[0].finish(JobState.CANCELLED)
    await stopped


# -- with the real runner, encoders and store --------------------------------

SLEEPER = Profile(
    name="sleeper",
    description="an encoder that only waits, to be stopped part-way",
    executable="sh",
    argv=("-c", "exec sleep 30", "sh", "{file}", "{output}"),
)


def real_profiles() -> dict[str, Profile]:
    return {**builtin_profiles(), SLEEPER.name: SLEEPER}


def real_registry(tmp_path: Path) -> JobRegistry:
    profiles = real_profiles()
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    registry = JobRegistry(reactor, store, tmp_path, profiles, workers=2, kill_grace=2.0)
    registry.start()
    return registry


def real_job(registry: JobRegistry, clip: Path, profile: str) -> Job:
    job = Job(
        id=new_job_id(),
        profile=profile,
        params=real_profiles()[profile].validate_params({}),
        inputs=[InputFile("file", clip.name, clip.stat().st_size, "00" * 32, "input/file.mp4")],
    )
    d = registry.job_dir(job.id)
    (d / "input").mkdir(parents=True)
    (d / "input" / "file.mp4").write_bytes(clip.read_bytes())
    return job


async def until(registry: JobRegistry, job: Job, done: Callable[[Job], bool]) -> None:
    while not done(job):
        await registry.changed(job.id).addTimeout(30, reactor)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # The reactor reaps its children; a zombie here would be a leak.
    return False


@pytest_twisted.ensureDeferred
async def test_real_encode(tmp_path: Path, clips: Any) -> None:
    """A job runs mencoder through the runner to a checked result, recorded in the store."""
    registry = real_registry(tmp_path)
    seen: list[float] = []
    registry.subscribe(lambda j: seen.append(j.progress))
    try:
        job = await registry.add(real_job(registry, clips.av, "avi-mpeg4"))
        await until(registry, job, lambda j: j.state.finished)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.output is not None
        assert (registry.job_dir(job.id) / job.output.path).stat().st_size == job.output.size
        assert job.progress == 100.0 and job.pid is None
        assert seen == sorted(seen), "progress only grows"
    finally:
        await registry.stop()
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    try:
        [stored] = store.load()
        assert stored == job
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_real_cancel_and_stop(tmp_path: Path, clips: Any) -> None:
    """
    Cancelling a real running encoder ends its process and the job is cancelled;
    stopping the registry ends another and leaves its job queued.
    """
    registry = real_registry(tmp_path)
    stopped = False
    try:
        cancelled = await registry.add(real_job(registry, clips.av, "sleeper"))
        requeued = await registry.add(real_job(registry, clips.av, "sleeper"))
        for job in (cancelled, requeued):
            # The pid is not a change clients see, so changed() does not report it.
            while job.pid is None:
                await deferLater(reactor, 0.02, lambda: None)
        pids = cancelled.pid, requeued.pid
        assert None not in pids

        result = await registry.cancel(cancelled.id)
        assert result is cancelled and cancelled.state is JobState.CANCELLED
        assert cancelled.pid is None

        await registry.stop()
        stopped = True
        assert requeued.state is JobState.QUEUED and requeued.pid is None
        assert all(process_gone(pid) for pid in pids if pid is not None)
    finally:
        if not stopped:
            await registry.stop()

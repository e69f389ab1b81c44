"""Tests for L{transcoder.core.retention}: the periodic removal of old finished jobs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from transcoder.core.jobs import InputFile, Job, JobState, new_job_id
from transcoder.core.profiles import Profile
from transcoder.core.registry import JobRegistry
from transcoder.core.retention import RetentionSweeper
from transcoder.testing import EndingExecutor, FakeJobSource, MemoryStore

T0 = 1_700_000_000.0
PROFILE = Profile(
    name="copy",
    description="test profile",
    executable="true",
    argv=("{file}", "{output}"),
    timeout=None,
)


@dataclass
class Env:
    clock: Clock
    store: MemoryStore
    executor: EndingExecutor
    registry: JobRegistry

    def add(self) -> Job:
        job = Job(
            id=new_job_id(),
            profile="copy",
            params={},
            inputs=[InputFile("file", "clip.mov", 3, "00" * 32, "input/file.mov")],
        )
        d = self.registry.job_dir(job.id)
        (d / "input").mkdir(parents=True)
        (d / "input" / "file.mov").write_bytes(b"abc")
        added = self.registry.add(job)
        assert added.called
        return job


@pytest.fixture
def env(tmp_path: Path) -> Env:
    clock = Clock()
    clock.advance(T0)
    store = MemoryStore()
    executor = EndingExecutor()
    registry = JobRegistry(clock, store, tmp_path, {"copy": PROFILE}, workers=1, executor=executor)
    registry.start()
    return Env(clock, store, executor, registry)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every log event carrying a failure, while the test runs."""
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "log_failure" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_deletes_only_finished_jobs_older_than_keep(env: Env) -> None:
    """A sweep removes jobs finished at least `keep` ago, with files and rows; others stay."""
    old_ok = env.add()
    env.executor.finish(old_ok)
    old_failed = env.add()
    env.executor.finish(old_failed, JobState.FAILED)
    env.clock.advance(50)
    young = env.add()
    env.executor.finish(young)
    running = env.add()
    queued = env.add()
    cancelled = env.add()
    env.registry.cancel(cancelled.id)
    assert running.state is JobState.RUNNING and queued.state is JobState.QUEUED
    # Long after everything was created, old_* finished exactly 100 s ago.
    env.clock.advance(50)
    sweeper = RetentionSweeper(env.clock, env.registry, keep=100, interval=30)
    d = sweeper.sweep()
    assert d.called and d.result == 2
    gone = {old_ok.id, old_failed.id}
    assert {j.id for j in env.registry.jobs()} == {young.id, running.id, queued.id, cancelled.id}
    for job in (old_ok, old_failed):
        assert not env.registry.job_dir(job.id).exists()
        assert job.id not in env.store.rows
    assert set(env.store.rows) == {young.id, running.id, queued.id, cancelled.id}
    assert all(env.registry.job_dir(j.id).is_dir() for j in env.registry.jobs())
    assert gone.isdisjoint(j.id for j in env.registry.jobs())


def test_periodic_sweeps(env: Env) -> None:
    """start() sweeps at once and then every interval; a job goes at the first sweep past `keep`."""
    job = env.add()
    env.executor.finish(job)
    sweeper = RetentionSweeper(env.clock, env.registry, keep=100, interval=30)
    sweeper.start()
    # Sweeps at T0, T0+30, 60, 90 keep it; the one at T0+120 removes it.
    env.clock.advance(90)
    assert env.registry.get(job.id) is job
    env.clock.advance(29)
    assert env.registry.get(job.id) is job
    env.clock.advance(1)
    assert env.registry.get(job.id) is None
    sweeper.stop()


@pytest.mark.parametrize("keep", [3, 100, 7 * 86400])
def test_default_interval_removes_a_job_at_most_a_tenth_late(env: Env, keep: float) -> None:
    """
    Without an interval, a job goes by keep + keep/10 (at least 1 s, at
    most 5 minutes) after it finished: a short --keep-results is not
    rounded up to 5 minutes.
    """
    job = env.add()
    env.executor.finish(job)
    sweeper = RetentionSweeper(env.clock, env.registry, keep=keep)
    sweeper.start()
    env.clock.advance(keep - 0.5)
    assert env.registry.get(job.id) is job
    late = min(300.0, max(1.0, keep / 10))
    # Step by step, as a real clock would fire each sweep in turn.
    for _ in range(int(late * 2) + 2):
        env.clock.advance(0.5)
    assert env.registry.get(job.id) is None
    sweeper.stop()


def test_first_sweep_at_start(env: Env) -> None:
    """Jobs that expired while no sweeper ran (e.g. across a restart) go when it starts."""
    job = env.add()
    env.executor.finish(job)
    env.clock.advance(1000)
    sweeper = RetentionSweeper(env.clock, env.registry, keep=100)
    sweeper.start()
    assert env.registry.get(job.id) is None
    sweeper.stop()


def test_running_jobs_are_never_deleted(env: Env) -> None:
    """A job running (or queued) far longer than `keep` stays; it goes only after it finishes."""
    running = env.add()
    queued = env.add()
    sweeper = RetentionSweeper(env.clock, env.registry, keep=10, interval=5)
    sweeper.start()
    env.clock.advance(1000)
    assert env.registry.get(running.id) is running
    assert env.registry.get(queued.id) is queued
    assert running.state is JobState.RUNNING
    env.executor.finish(running)
    env.clock.advance(5)
    assert env.registry.get(running.id) is running
    env.clock.advance(5)
    assert env.registry.get(running.id) is None
    assert env.registry.get(queued.id) is queued
    sweeper.stop()


def test_stop_leaves_nothing_scheduled(env: Env) -> None:
    """After stop(), no timer remains and time passing deletes nothing."""
    job = env.add()
    env.executor.finish(job)
    sweeper = RetentionSweeper(env.clock, env.registry, keep=100, interval=30)
    sweeper.start()
    assert len(env.clock.getDelayedCalls()) == 1
    d = sweeper.stop()
    assert d.called
    assert env.clock.getDelayedCalls() == []
    env.clock.advance(1000)
    assert env.registry.get(job.id) is job


def finished(age: float, now: float = T0) -> Job:
    return Job(
        id=new_job_id(),
        profile="copy",
        params={},
        inputs=[],
        state=JobState.SUCCEEDED,
        created_at=now - age - 1,
        started_at=now - age - 1,
        finished_at=now - age,
    )


class FakeRegistry(FakeJobSource):
    """A registry whose deletions complete when the test says, or fail."""

    def __init__(self, jobs: list[Job]) -> None:
        super().__init__()
        self.live = {j.id: j for j in jobs}
        self.deleting: dict[str, Deferred[bool]] = {}
        self.broken: set[str] = set()
        self.jobs_broken = False

    def jobs(self) -> list[Job]:
        if self.jobs_broken:
            raise RuntimeError("jobs() broke")
        return list(self.live.values())

    def get(self, job_id: str) -> Job | None:
        return self.live.get(job_id)

    def delete(self, job_id: str) -> Deferred[bool]:
        if job_id in self.broken:
            return fail(OSError("disk on fire"))
        d: Deferred[bool] = Deferred()
        self.deleting[job_id] = d

        def done(ok: bool) -> bool:
            self.live.pop(job_id, None)
            return ok

        return d.addCallback(done)

    def complete(self) -> None:
        for job_id, d in list(self.deleting.items()):
            del self.deleting[job_id]
            d.callback(True)


def test_one_sweep_at_a_time() -> None:
    """While a sweep waits on a deletion, neither the timer nor sweep() starts another."""
    clock = Clock()
    clock.advance(T0)
    jobs = [finished(500), finished(600)]
    registry = FakeRegistry(jobs)
    sweeper = RetentionSweeper(clock, registry, keep=100, interval=10)
    sweeper.start()
    # One deletion at a time, even within a sweep.
    assert len(registry.deleting) == 1
    second_call = sweeper.sweep()
    clock.advance(50)
    assert len(registry.deleting) == 1
    assert not second_call.called
    registry.complete()
    assert len(registry.deleting) == 1
    registry.complete()
    assert registry.live == {}
    assert second_call.called and second_call.result == 2
    # The loop goes on once the slow sweep is over.
    late = finished(200, now=clock.seconds())
    registry.live[late.id] = late
    clock.advance(10)
    registry.complete()
    assert registry.live == {}
    sweeper.stop()


def test_errors_are_logged_and_the_loop_goes_on(logged: list[LogEvent]) -> None:
    """A failed deletion or a broken registry is logged; other jobs and later sweeps go on."""
    clock = Clock()
    clock.advance(T0)
    broken, fine = finished(500), finished(500)
    registry = FakeRegistry([broken, fine])
    registry.broken.add(broken.id)
    sweeper = RetentionSweeper(clock, registry, keep=100, interval=10)
    sweeper.start()
    registry.complete()
    assert set(registry.live) == {broken.id}
    assert len(logged) == 1
    assert logged[0]["job_id"] == broken.id
    registry.jobs_broken = True
    clock.advance(10)
    assert len(logged) == 2
    registry.jobs_broken = False
    registry.broken.clear()
    clock.advance(10)
    registry.complete()
    assert registry.live == {}
    assert len(clock.getDelayedCalls()) == 1
    sweeper.stop()


def test_stop_during_a_sweep_waits_for_the_deletion_in_progress() -> None:
    """stop() fires once the deletion under way ends, and starts no further deletion."""
    clock = Clock()
    clock.advance(T0)
    first, second = finished(500), finished(500)
    registry = FakeRegistry([first, second])
    sweeper = RetentionSweeper(clock, registry, keep=100, interval=10)
    sweeper.start()
    assert len(registry.deleting) == 1
    stopped = sweeper.stop()
    assert not stopped.called
    registry.complete()
    assert stopped.called
    assert registry.deleting == {}
    assert len(registry.live) == 1
    assert clock.getDelayedCalls() == []


def test_bad_arguments() -> None:
    """A negative keep or a non-positive interval is refused."""
    with pytest.raises(ValueError):
        RetentionSweeper(Clock(), FakeRegistry([]), keep=-1)
    with pytest.raises(ValueError):
        RetentionSweeper(Clock(), FakeRegistry([]), keep=10, interval=0)

"""
Fakes shared by the unit tests: an in-memory job store, pretend encoders, and
a reactor whose spawnProcess spawns nothing.
(Real encoders and real SQLite are exercised elsewhere.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from zope.interface import implementer

from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import IJobStore, Job, JobState, OutputFile


@dataclass
class FakeOutcome:
    state: JobState
    output: OutputFile | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None


@dataclass(eq=False)
class FakeExecution:
    """One pretend encoder run; the test decides when and how it ends."""

    kwargs: dict[str, Any]
    deferred: Deferred[FakeOutcome] = field(default_factory=Deferred)
    pid: int | None = None
    cancels: int = 0

    @property
    def job_id(self) -> str:
        return Path(self.kwargs["job_dir"]).name

    def progress(self, percent: float) -> None:
        self.kwargs["on_progress"](percent)

    def spawn(self, pid: int) -> None:
        self.pid = pid
        self.kwargs["on_spawn"](pid)

    def finish(self, state: JobState = JobState.SUCCEEDED, **kw: Any) -> None:
        self.deferred.callback(FakeOutcome(state, **kw))

    def cancel(self) -> None:
        self.cancels += 1


class FakeExecutor:
    """Records every execution and how many ran at once."""

    def __init__(self) -> None:
        self.executions: list[FakeExecution] = []
        self.active = 0
        self.most_active = 0
        self.fail_next = False

    def __call__(self, reactor: Any, /, **kwargs: Any) -> FakeExecution:
        if self.fail_next:
            self.fail_next = False
            raise OSError("no such encoder")
        execution = FakeExecution(kwargs)
        self.executions.append(execution)
        self.active += 1
        self.most_active = max(self.most_active, self.active)

        def ended(result: object) -> object:
            self.active -= 1
            return result

        # Added before the registry's own callback, so a successor started by
        # the registry is counted only after this one stopped counting.
        execution.deferred.addBoth(ended)
        return execution

    @property
    def started_ids(self) -> list[str]:
        return [e.job_id for e in self.executions]

    def running(self) -> list[FakeExecution]:
        return [e for e in self.executions if not e.deferred.called]


@implementer(IJobStore)
class MemoryStore:
    """An L{IJobStore} that keeps a copy of every record it was given."""

    path = Path(":memory:")

    def __init__(self, jobs: list[Job] | None = None) -> None:
        self.rows: dict[str, dict[str, Any]] = {j.id: j.to_record() for j in jobs or []}
        self.saves: list[dict[str, Any]] = []
        self.closed = False
        # While set, every write fails with it (a full disk, say).
        self.failing: Exception | None = None
        self.failed_writes = 0

    def load(self) -> list[Job]:
        return sorted((Job.from_record(r) for r in self.rows.values()), key=lambda j: j.seq)

    def save(self, job: Job) -> Deferred[None]:
        assert not self.closed, "save after close"
        if self.failing is not None:
            self.failed_writes += 1
            return fail(self.failing)
        record = job.to_record()
        self.saves.append(record)
        self.rows[job.id] = record
        return succeed(None)

    def delete(self, job_id: str) -> Deferred[None]:
        self.rows.pop(job_id, None)
        return succeed(None)

    def check(self) -> Deferred[None]:
        if self.failing is not None:
            self.failed_writes += 1
            return fail(self.failing)
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def saves_of(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.saves if r["id"] == job_id]


@dataclass(eq=False)
class EndingExecution:
    """A pretend encoder run that a cancel ends at once."""

    deferred: Deferred[FakeOutcome] = field(default_factory=Deferred)
    pid: int | None = None

    def cancel(self) -> None:
        self.deferred.callback(FakeOutcome(JobState.CANCELLED))


class EndingExecutor:
    """Pretend encoders: each run ends when the test says, or at once when cancelled."""

    def __init__(self) -> None:
        self.runs: dict[str, EndingExecution] = {}

    def __call__(self, reactor: Any, /, **kwargs: Any) -> EndingExecution:
        execution = EndingExecution()
        self.runs[Path(kwargs["job_dir"]).name] = execution
        return execution

    def finish(self, job: Job, state: JobState = JobState.SUCCEEDED) -> None:
        self.runs[job.id].deferred.callback(FakeOutcome(state))


@dataclass
class FakeTransport:
    pid: int
    signals: list[str | int] = field(default_factory=list)
    stdin_closed: bool = False

    def signalProcess(self, sig: str | int) -> None:
        self.signals.append(sig)

    def closeStdin(self) -> None:
        self.stdin_closed = True


@implementer(IReactorProcess)
class FakeReactor(Clock):
    """A Clock whose spawnProcess records what it was asked and spawns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(
        self, proto: ProcessProtocol, executable: str, args: list[str], **kw: Any
    ) -> FakeTransport:
        transport = FakeTransport(pid=90000 + len(self.spawned))
        proto.makeConnection(transport)  # type: ignore[arg-type]
        self.spawned.append({"proto": proto, "executable": executable, "args": args, **kw})
        return transport


@implementer(IJobSource)
class AnnouncingRegistry:
    """The registry's read and subscription surface, with changes announced by the test (L{change})."""

    def __init__(self) -> None:
        self.subscribers: list[Callable[[Job], None]] = []
        self.live: dict[str, Job] = {}

    def subscribe(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def jobs(self) -> list[Job]:
        return list(self.live.values())

    def get(self, job_id: str) -> Job | None:
        return self.live.get(job_id)

    def delete(self, job_id: str) -> Deferred[bool]:
        return succeed(self.live.pop(job_id, None) is not None)

    queued_count = 0
    running_count = 0

    def change(self, job: Job) -> None:
        self.live[job.id] = job
        for callback in list(self.subscribers):
            callback(job)

"""
Fakes for testing code that uses the transcoder, in the manner of
C{treq.testing}: a reactor whose C{spawnProcess} spawns nothing, an in-memory
job store, pretend encoders whose runs end when the test says, and a job
source whose changes the test announces.

With them the registry, the runner and the probe are driven by a test alone,
on a L{Clock}; real encoders and real SQLite are exercised by the end-to-end
tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IProcessProtocol,
    IProcessTransport,
    IReactorProcess,
)
from twisted.internet.task import Clock
from zope.interface import implementer

from transcoder.core.executor import Ended
from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import IJobStore, Job, JobState

__all__ = [
    "EndingExecution",
    "EndingExecutor",
    "FakeExecution",
    "FakeExecutor",
    "FakeJobSource",
    "FakeOutcome",
    "FakeProcessTransport",
    "FakeReactor",
    "MemoryStore",
]


# How a pretend encoder run ended: the registry's own outcome type serves.
FakeOutcome = Ended


@dataclass(eq=False)
class FakeExecution:
    """
    One pretend encoder run; the test decides when and how it ends.

    @ivar kwargs: what the registry gave the executor (C{job_dir},
        C{on_progress}, C{on_spawn}, ...).
    @ivar cancels: how many times the registry asked it to stop; a cancel
        does not end it (L{EndingExecution} does).
    """

    kwargs: dict[str, Any]
    deferred: Deferred[FakeOutcome] = field(default_factory=Deferred)
    pid: int | None = None
    cancels: int = 0

    @property
    def job_id(self) -> str:
        """The id of the job this run is for."""
        return Path(self.kwargs["job_dir"]).name

    def progress(self, percent: float) -> None:
        """Report C{percent} done, as an encoder's output would."""
        self.kwargs["on_progress"](percent)

    def spawn(self, pid: int) -> None:
        """Report the encoder started as process (group) C{pid}."""
        self.pid = pid
        self.kwargs["on_spawn"](pid)

    def finish(self, state: JobState = JobState.SUCCEEDED, **kw: Any) -> None:
        """End the run in C{state}; C{kw} are the other fields of its L{FakeOutcome}."""
        self.deferred.callback(FakeOutcome(state, **kw))

    def cancel(self) -> None:
        self.cancels += 1


class FakeExecutor:
    """
    An L{transcoder.core.executor.Executor} that runs nothing: it records each
    run as a L{FakeExecution}, and how many were running at once.

    @ivar fail_next: when set, the next call raises (an encoder that cannot
        start), and it is cleared.
    """

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
        """The ids of the jobs whose runs started, in order."""
        return [e.job_id for e in self.executions]

    def running(self) -> list[FakeExecution]:
        """The runs that have not ended."""
        return [e for e in self.executions if not e.deferred.called]


@dataclass(eq=False)
class EndingExecution:
    """A pretend encoder run that a cancel ends at once, as cancelled."""

    deferred: Deferred[FakeOutcome] = field(default_factory=Deferred)
    pid: int | None = None

    def cancel(self) -> None:
        self.deferred.callback(FakeOutcome(JobState.CANCELLED))


class EndingExecutor:
    """
    An executor of L{EndingExecution}s: each run ends when the test says
    (L{finish}), or at once when cancelled.

    @ivar runs: the latest run of each job, by job id.
    """

    def __init__(self) -> None:
        self.runs: dict[str, EndingExecution] = {}

    def __call__(self, reactor: Any, /, **kwargs: Any) -> EndingExecution:
        execution = EndingExecution()
        self.runs[Path(kwargs["job_dir"]).name] = execution
        return execution

    def finish(self, job: Job, state: JobState = JobState.SUCCEEDED) -> None:
        """End C{job}'s run in C{state}."""
        self.runs[job.id].deferred.callback(FakeOutcome(state))


@implementer(IJobStore)
class MemoryStore:
    """
    An L{IJobStore} that keeps a copy of every record it was given.

    @ivar rows: the stored records, by job id.
    @ivar saves: every record saved, in order.
    @ivar failing: while set, every write (and check) fails with it: a full
        disk, say.  C{failed_writes} counts those.
    """

    path = Path(":memory:")

    def __init__(self, jobs: list[Job] | None = None) -> None:
        self.rows: dict[str, dict[str, Any]] = {j.id: j.to_record() for j in jobs or []}
        self.saves: list[dict[str, Any]] = []
        self.closed = False
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
        """Every record saved for C{job_id}, in order."""
        return [r for r in self.saves if r["id"] == job_id]


@implementer(IAddress)
@dataclass(frozen=True)
class _ProcessAddress:
    """Where a process transport's peer is: nowhere on a network."""


@implementer(IProcessTransport)
@dataclass(eq=False)
class FakeProcessTransport:
    """
    The transport of a process that does not exist: it records what it is
    asked to do.

    @ivar signals: the signals sent, in order.
    @ivar written: the bytes written to each child file descriptor.
    @ivar closed_fds: the child file descriptors closed.
    """

    pid: int | None
    signals: list[str | int] = field(default_factory=list)
    written: dict[int, bytes] = field(default_factory=dict)
    closed_fds: set[int] = field(default_factory=set)
    lost: bool = False

    @property
    def stdin_closed(self) -> bool:
        return 0 in self.closed_fds

    def signalProcess(self, signalID: str | int) -> None:
        self.signals.append(signalID)

    def closeStdin(self) -> None:
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def closeChildFD(self, descriptor: int) -> None:
        self.closed_fds.add(descriptor)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.written[childFD] = self.written.get(childFD, b"") + data

    def write(self, data: bytes) -> None:
        self.writeToChild(0, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        self.lost = True
        for fd in (0, 1, 2):
            self.closeChildFD(fd)

    def getPeer(self) -> IAddress:
        return _ProcessAddress()

    def getHost(self) -> IAddress:
        return _ProcessAddress()


@implementer(IReactorProcess)
class FakeReactor(Clock):
    """
    A L{Clock} whose C{spawnProcess} spawns nothing: it connects the protocol
    to a L{FakeProcessTransport} and records the call.

    @ivar spawned: one dict per call, with the protocol (C{proto}) and every
        argument under its parameter's name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> FakeProcessTransport:
        transport = FakeProcessTransport(pid=90000 + len(self.spawned))
        processProtocol.makeConnection(transport)
        self.spawned.append(
            {
                "proto": processProtocol,
                "executable": executable,
                "args": args,
                "env": env,
                "path": path,
                "uid": uid,
                "gid": gid,
                "usePTY": usePTY,
                "childFDs": childFDs,
            }
        )
        return transport


@implementer(IJobSource)
class FakeJobSource:
    """
    An L{IJobSource} whose jobs change when the test announces it (L{change}).

    @ivar live: the jobs it holds, by id.
    @ivar subscribers: those told of each change.
    """

    queued_count = 0
    running_count = 0

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

    def exclusive_sweep(self) -> Deferred[Callable[[], Deferred[None]] | None]:
        return succeed(lambda: succeed(None))

    def change(self, job: Job) -> None:
        """Hold C{job} as it is now, and tell every subscriber."""
        self.live[job.id] = job
        for callback in list(self.subscribers):
            callback(job)

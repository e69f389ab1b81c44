"""
Jobs: what a job is, its states, and the storage interface behind the registry.

A job is created only once all of its inputs are on disk (an interrupted upload
never becomes a job), so every stored job has complete inputs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# The most a running job shows: 100 means succeeded.
RUNNING_MAX_PROGRESS = 99.9


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class InputFile:
    """One uploaded input: C{name} is its role in the profile (C{file}, C{video}, C{audio})."""

    name: str
    filename: str
    size: int
    sha256: str
    # Relative to the job's directory.
    path: str
    # What the probe learnt of it (container, duration, streams), once it answered.
    media: dict[str, Any] | None = None


@dataclass
class OutputFile:
    size: int
    sha256: str
    media_type: str
    # Relative to the job's directory.
    path: str
    duration: float | None = None
    # Its name under /jobs/<id>/outputs/ ("" for a one-output job's result:
    # result.<ext>); relative to the job's output directory, "/" between levels.
    name: str = ""


@dataclass
class Job:
    id: str
    profile: str
    params: dict[str, int | float | str]
    inputs: list[InputFile]
    state: JobState = JobState.QUEUED
    progress: float = 0.0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    output: OutputFile | None = None
    # Every output of a multi-output profile's job (its output stays None).
    outputs: list[OutputFile] = field(default_factory=list)
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None
    # Path of the encoder log, relative to the job's directory.
    log_path: str = "encoder.log"
    # Process group of a running encoder, kept so that a restarted server can
    # find and stop an encoder that outlived its predecessor.
    pid: int | None = None
    # Name of the token that created the job (None when the service is open).
    owner: str | None = None
    callback_url: str | None = None
    # Sequence number giving FIFO order across restarts.
    seq: int = 0
    # With several nodes: the node that runs (or last ran) the job, and which
    # run of it this is; writes about a running job are fenced on both.
    node: str | None = None
    attempt: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def result_files(self) -> list[OutputFile]:
        """
        Every output, each with its name: a multi-output job's C{outputs}, or
        a one-output job's C{output} as C{result.<ext>} (whatever attempt made it).
        """
        if self.outputs:
            return list(self.outputs)
        if self.output is None:
            return []
        name = self.output.name or "result" + PurePosixPath(self.output.path).suffix
        return [replace(self.output, name=name)]

    def describe_inputs(self, media: Mapping[str, dict[str, Any]] | None) -> None:
        """Keep what the probes learnt of each input (by role), when they answered."""
        for i in self.inputs:
            if media and i.name in media:
                i.media = media[i.name]

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict holding everything, for storage."""
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Job:
        d = dict(d)
        d["state"] = JobState(d["state"])
        d["inputs"] = [InputFile(**i) for i in d["inputs"]]
        d["output"] = OutputFile(**d["output"]) if d.get("output") else None
        d["outputs"] = [OutputFile(**o) for o in d.get("outputs") or []]
        return cls(**d)


class StoreClosed(RuntimeError):
    """A job store was used after its C{close}."""


class StoreUnavailable(RuntimeError):
    """A job store cannot be opened: its database is unreachable, refuses us, or is too new."""


class IJobStore(Interface):
    """
    Durable storage for jobs.  The registry keeps every live job in memory and
    writes through to a store, so reads never wait on it.
    """

    def load() -> list[Job]:
        """Every stored job, oldest first.  Called once, at start-up, before any job runs."""

    def save(job: Job) -> Deferred[None]:
        """Insert or replace C{job}.  Calls for one job complete in the order made."""

    def delete(job_id: str) -> Deferred[None]:
        """Forget a job."""

    def check() -> Deferred[None]:
        """Make a small write, to learn whether the store takes writes again after failing."""

    def close() -> Deferred[None]:
        """Finish pending writes and release the storage."""

    path = Attribute("Where the store lives, for logs.")


class LostJob(RuntimeError):
    """
    A write about a running job changed nothing: another node (or a later
    attempt) owns it now, so this node must stop its encoder and forget it.
    """


class NodeNameTaken(StoreUnavailable):
    """Another live node already runs under this node's name."""


@dataclass(frozen=True)
class JobChange:
    """
    What an L{IClusterStore} feed says of one changed job: its id and, when the
    notification could carry it, the row as L{IClusterStore.get} gives it
    (None for a deleted job).  C{carried} is False when only the id came, and
    the row must be read.
    """

    job_id: str
    carried: bool
    found: tuple[Job, bool] | None = None


class IClusterStore(Interface):
    """
    What a store shared by several nodes adds to L{IJobStore}: claims, leases
    and fencing, a node table, and a feed of changes.  Every method runs off
    the reactor thread and returns a Deferred.

    L{IJobStore.save} of a job with a C{node} is fenced: it writes only while
    that node still holds that C{attempt}, and fails with L{LostJob} otherwise.
    """

    def insert(job: Job) -> Deferred[int]:
        """Store a new queued job, numbered from the database's sequence; fires with its C{seq}."""

    def claim(node: str, lease: float) -> Deferred[Job | None]:
        """Take the first queued job (priority, then FIFO) for C{node}: running, attempt + 1."""

    def renew(node: str, running: dict[str, int], lease: float) -> Deferred[dict[str, bool]]:
        """
        Extend the leases of C{running} (job id: attempt) and heartbeat C{node}.
        Fires with the ids still held, each with whether a cancel was asked for.
        """

    def release(job: Job) -> Deferred[None]:
        """
        Give back C{job}, which its node stopped cleanly (fenced as L{IJobStore.save},
        failing with L{LostJob}): queued again, and the attempt it used not counted.
        """

    def requeue_expired(max_attempts: int) -> Deferred[list[str]]:
        """Jobs whose lease expired go back to the queue, or fail after C{max_attempts}."""

    def cancel(job_id: str, now: float) -> Deferred[str]:
        """
        Cancel a queued job at once (C{"cancelled"}), ask the node running it to
        (C{"requested"}), or leave a finished one (C{"finished"}); C{"missing"}
        when there is no such job.
        """

    def get(job_id: str) -> Deferred[tuple[Job, bool] | None]:
        """The stored job and whether its cancel was asked for, or None."""

    def snapshot() -> Deferred[list[tuple[Job, bool]]]:
        """Every stored job, as L{get} gives each."""

    def register_node(node: str, workers: int, lease: float) -> Deferred[None]:
        """Record this node; fails with L{NodeNameTaken} when a live node has the name."""

    def unregister_node(node: str) -> Deferred[None]:
        """Forget this node, so that its name is free at once."""

    def nodes(lease: float) -> Deferred[list[dict[str, Any]]]:
        """Live nodes (a heartbeat within C{lease}): name, workers, running, heartbeat_at."""

    def listen(on_change: Callable[[JobChange | None], None]) -> Callable[[], None]:
        """
        Call C{on_change} (on the reactor thread) with a L{JobChange} for each job
        that changed, in commit order, and with None when changes may have been
        missed (the feed was (re)connected); returns a function that stops the feed.
        """

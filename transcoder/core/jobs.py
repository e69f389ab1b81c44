"""
Jobs: what a job is, its states, and the storage interface behind the registry.

A job is created only once all of its inputs are on disk (an interrupted upload
never becomes a job), so every stored job has complete inputs.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
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


@dataclass
class OutputFile:
    size: int
    sha256: str
    media_type: str
    # Relative to the job's directory.
    path: str
    duration: float | None = None


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
    extra: dict[str, Any] = field(default_factory=dict)

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

"""
Writing jobs through to the job store, and knowing whether it takes writes.

A store that refuses a write (a full disk, most often) is tested again every
L{STORE_RECHECK} seconds until it takes one; meanwhile L{StoreWriter.error}
says why, and the registry starts no job and takes no upload.  A job's end
is shown only once it is recorded (L{StoreWriter.record}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.files import remove_results
from transcoder.core.jobs import RUNNING_MAX_PROGRESS, IJobStore, Job, JobState, LostJob

_log = Logger()

# Pauses between attempts to record a job's end; once they are used up, the
# job is recorded as failed for the store's sake instead (see StoreWriter.record).
_RECORD_RETRIES = (0.1, 0.5, 1.0, 2.0)
# Seconds between writes that test a failing store, and between the later
# attempts to record a job's end.
STORE_RECHECK = 2.0

_JOB_FIELDS = tuple(f.name for f in fields(Job))


def call_store(f: Callable[[Any], Deferred[None]], arg: Any) -> Deferred[None]:
    """C{f(arg)}, with an exception it raises turned into a failed Deferred."""
    try:
        return f(arg)
    except Exception:
        return fail()


class StoreWriter:
    """
    Writes jobs to an L{IJobStore} and tracks whether its writes succeed.

    @ivar error: why the store's last write failed, until one succeeds again.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        store: IJobStore,
        on_recovered: Callable[[], None],
        on_lost: Callable[[Job], None] | None = None,
    ) -> None:
        """
        @param on_recovered: called when a write succeeds after one failed.
        @param on_lost: called with a job whose write was refused because
            another node holds it now (L{LostJob}): the store is fine.
        """
        self._reactor = reactor
        self._store = store
        self._on_recovered = on_recovered
        self._on_lost = on_lost
        self.error: str | None = None
        self._check: IDelayedCall | None = None
        self._stopping = False

    def stop(self) -> None:
        """Test the store no more: the registry is stopping."""
        self._stopping = True
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None

    def persist(self, job: Job) -> Deferred[None]:
        """Write C{job} through to the store; a failure is logged, never raised."""

        def failed(f: Failure) -> None:
            if f.check(LostJob):
                self.lost(job)
                return
            _log.failure("could not store job {job_id}", f, job_id=job.id)
            self.failed(f.value)

        return call_store(self._store.save, job).addCallbacks(lambda _: self.ok(), failed)

    def record(
        self,
        job: Job,
        change: Callable[[Job], None],
        job_dir: Path,
        abandoned: Callable[[], bool],
    ) -> Deferred[bool]:
        """
        Apply C{change} (a job's end) to C{job} once the store has recorded it.

        Until then clients see the job as it was: a state they saw must
        survive a restart.  Each write is tried again after a pause; when
        L{_RECORD_RETRIES} are used up, the job is recorded as failed for the
        store's sake instead, its result in C{job_dir} removed (space back on
        a full disk is what most often lets the next write through), and that
        is tried until it is written.  Once C{abandoned()} (the registry stops,
        or the job was deleted), it gives up: the job keeps its stored state
        and runs again at the next start.

        @return: fires with whether C{job} was changed.
        """
        return Deferred.fromCoroutine(self._record_until_stored(job, change, job_dir, abandoned))

    async def _record_until_stored(
        self,
        job: Job,
        change: Callable[[Job], None],
        job_dir: Path,
        abandoned: Callable[[], bool],
    ) -> bool:
        draft = Job.from_record(job.to_record())
        change(draft)
        failures = 0
        while True:
            try:
                await call_store(self._store.save, draft)
            except LostJob:
                # The draft, not the job: a copy of the table may already have
                # made the job the next attempt's, whose files are not ours.
                self.lost(draft)
                return False
            except Exception as e:
                if failures == 0:
                    _log.failure("could not record the end of job {job_id}", job_id=job.id)
                else:
                    _log.warn(
                        "could not record the end of job {job_id} ({error}), attempt {n}",
                        job_id=job.id,
                        error=str(e),
                        n=failures + 1,
                    )
                self.failed(e)
                failures += 1
                if failures == len(_RECORD_RETRIES) + 1:
                    draft = Job.from_record(job.to_record())
                    _store_failure(draft, self._reactor.seconds(), e)
                    remove_results(job_dir)
                pause = _RECORD_RETRIES[failures - 1] if failures <= len(_RECORD_RETRIES) else None
                await deferLater(self._reactor, pause or STORE_RECHECK, lambda: None)
                if abandoned():
                    return False
                continue
            self.ok()
            for name in _JOB_FIELDS:
                setattr(job, name, getattr(draft, name))
            return True

    def lost(self, job: Job) -> None:
        """Another node holds C{job} now: this node's writes about it are refused."""
        _log.warn("job {job_id} is no longer this node's (attempt {attempt})", job_id=job.id,
                  attempt=job.attempt)  # fmt: skip
        if self._on_lost is not None:
            self._on_lost(job)

    def failed(self, error: BaseException | None) -> None:
        """A write failed with C{error}: test the store until one succeeds."""
        if self.error is None:
            _log.error(
                "the job store failed ({error}): no job starts and no upload is taken "
                "until it takes writes again",
                error=str(error),
            )
        self.error = str(error) or type(error).__name__
        if self._check is None and not self._stopping:
            self._check = self._reactor.callLater(STORE_RECHECK, self._check_store)

    def ok(self) -> None:
        """A write succeeded."""
        if self.error is None:
            return
        _log.info("the job store takes writes again")
        self.error = None
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self._on_recovered()

    def _check_store(self) -> None:
        self._check = None
        if self.error is None or self._stopping:
            return

        def failed(f: Failure) -> None:
            self.failed(f.value)

        call_store(lambda _: self._store.check(), None).addCallbacks(lambda _: self.ok(), failed)


def _store_failure(job: Job, now: float, error: BaseException) -> None:
    """C{job} failed because its end could not be recorded."""
    job.state = JobState.FAILED
    job.error = f"the server could not record this job's outcome: {error}"
    job.finished_at = now
    job.output = None
    job.progress = min(job.progress, RUNNING_MAX_PROGRESS)

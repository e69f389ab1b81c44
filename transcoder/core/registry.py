"""
The job registry: the in-memory authority over jobs.

Every job lives in memory, so reads never wait; each change is written through
to an L{IJobStore}.  Queued jobs run in FIFO order, at most C{workers} at once.
After a crash, L{JobRegistry.start} stops encoders that outlived the previous
server and puts their jobs back in the queue.
"""

from __future__ import annotations

import heapq
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.errors import Unavailable
from transcoder.core.jobs import IJobStore, Job, JobState, OutputFile, is_job_id
from transcoder.core.profiles import ParamValue, Profile

_log = Logger()

# Progress alone is written to the store at most this often per job.
PROGRESS_SAVE_INTERVAL = 1.0
# The most a running job shows: 100 means succeeded.
RUNNING_MAX_PROGRESS = 99.9
# How long start-up waits for a leftover encoder to obey SIGTERM before SIGKILL.
_RECOVERY_GRACE = 2.0
# Retry-After for a full queue before any job has finished to measure by.
_DEFAULT_RETRY_AFTER = 30
# Free space in the data dir below which no upload is taken and no encoder
# runs: what the job store needs to record the states of the jobs in flight.
STORE_HEADROOM = 1 << 20
# Pauses between attempts to record a job's end; once they are used up, the
# job is recorded as failed for the store's sake instead (see _record).
_RECORD_RETRIES = (0.1, 0.5, 1.0, 2.0)
# Seconds between writes that test a failing store, and between the later
# attempts to record a job's end.
STORE_RECHECK = 2.0


class _Outcome(Protocol):
    """What L{transcoder.engine.outcome.Outcome} offers; typed here so the registry stands alone."""

    @property
    def state(self) -> JobState: ...
    @property
    def output(self) -> OutputFile | None: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def log_tail(self) -> str | None: ...


class _Execution(Protocol):
    """What L{transcoder.engine.runner.IJobExecution} offers."""

    @property
    def deferred(self) -> Deferred[Any]: ...
    def cancel(self) -> None: ...


class Executor(Protocol):
    """The signature of L{transcoder.engine.runner.execute_job}, which runs one job's encoder."""

    def __call__(
        self,
        reactor: Any,
        /,
        *,
        job_dir: Path,
        profile: Profile,
        inputs: Mapping[str, Path],
        params: Mapping[str, ParamValue],
        timeout: float | None,
        on_progress: Callable[[float], None],
        on_spawn: Callable[[int], None],
        kill_grace: float = ...,
        max_input_duration: float | None = ...,
    ) -> _Execution: ...


def _default_executor() -> Executor:
    # Imported here so the registry can be built and tested without the runner.
    from transcoder.engine.runner import execute_job

    return execute_job


@dataclass
class _InternalOutcome:
    state: JobState
    output: OutputFile | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None


def _failed(error: str) -> _InternalOutcome:
    return _InternalOutcome(JobState.FAILED, error=error)


@dataclass(eq=False)
class _Run:
    """One execution of a job, from the start of its encoder to its end."""

    job: Job
    last_saved: float
    execution: _Execution | None = None
    cancel_requested: bool = False
    # Set by stop(): the job goes back to the queue instead of finishing.
    requeue: bool = False
    flush_call: IDelayedCall | None = None
    ended: list[Deferred[Job]] = field(default_factory=list)


class JobRegistry:
    """
    Holds every job, schedules queued ones onto encoders, and records what happens.

    @ivar uploads_dir: where uploads in progress are written; emptied at start-up,
        since an upload that did not finish never becomes a job.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        store: IJobStore,
        data_dir: Path,
        profiles: Mapping[str, Profile],
        *,
        workers: int,
        max_queued: int | None = None,
        job_timeout: float | None = None,
        kill_grace: float = 5.0,
        executor: Executor | None = None,
        max_input_duration: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._reactor = reactor
        self._store = store
        self._data_dir = Path(data_dir)
        self._jobs_dir = self._data_dir / "jobs"
        self.uploads_dir = self._data_dir / "uploads"
        self._profiles = profiles
        self._workers = workers
        self._max_queued = max_queued
        self._job_timeout = job_timeout
        self._kill_grace = kill_grace
        self._executor = executor if executor is not None else _default_executor()
        self._max_input_duration = max_input_duration

        self._jobs: dict[str, Job] = {}
        # A heap of (seq, id); ids no longer in _queued are skipped when popped.
        self._queue: list[tuple[int, str]] = []
        self._queued: set[str] = set()
        self._running: dict[str, _Run] = {}
        self._waiters: dict[str, list[Deferred[Job]]] = {}
        self._subscribers: list[Callable[[Job], None]] = []
        self._next_seq = 1
        self._mean_run: float | None = None
        self._started = False
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._scheduling = False
        # Why the store's last write failed, until one succeeds again: no job
        # starts and no upload is taken meanwhile.
        self.store_error: str | None = None
        self._store_check: IDelayedCall | None = None

    # -- public surface ----------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self._jobs_dir / job_id

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def start(self) -> None:
        """Recover from the previous run, then start running queued jobs."""
        if self._started:
            raise RuntimeError("the registry is already started")
        self._recover()
        self._started = True
        self._schedule()

    def stop(self) -> Deferred[None]:
        """
        Stop every encoder, put its job back in the queue for the next start,
        wait for the encoders to end, and close the store.
        """
        if self._stopped is None:
            self._stopping = True
            self._stopped = Deferred.fromCoroutine(self._stop())
        # Every caller gets its own Deferred, so no caller's callbacks see another's results.
        mine: Deferred[None] = Deferred()
        self._stopped.addBoth(_chain_to(mine))
        return mine

    def check_capacity(self, arriving: int = 0) -> None:
        """
        Refuse a new job early, before its upload is read, when the queue is full.

        @param arriving: uploads still being received, each a job to come:
            those that will not find a free worker count as waiting, so that
            uploads at the same time cannot all pass the check (it is made
            before each body, and L{add} does not apply it).
        @raise Unavailable: with a retry time when C{max_queued} jobs already
            wait, or will once those uploads end.
        """
        if self._stopping:
            raise _shutting_down()
        if self.store_error is not None:
            raise Unavailable(
                "store_unavailable",
                "the server cannot record new jobs right now; try again later",
                _DEFAULT_RETRY_AFTER,
            )
        if self._max_queued is None:
            return
        free = max(0, self._workers - len(self._running))
        waiting = self.queued_count + max(0, arriving - free)
        if waiting >= self._max_queued:
            raise Unavailable(
                "queue_full",
                f"{waiting} jobs are already waiting or being uploaded; try again later",
                self._retry_after(),
            )

    def add(self, job: Job) -> Deferred[Job]:
        """
        Take a new job whose directory is complete on disk: number it, store it,
        and queue it.  The Deferred fires once the job is stored.

        The queue limit is not applied here (L{check_capacity} is, before the
        upload), so a finished upload is never thrown away.  If the job cannot
        be stored, its directory is removed and the Deferred fails; once
        L{stop} was called it fails with L{Unavailable} C{shutting_down}.
        """
        if self._stopping:
            return fail(_shutting_down())
        if not self._started:
            return fail(RuntimeError("the registry is not started"))
        if job.id in self._jobs:
            return fail(ValueError(f"job {job.id} already exists"))
        job.seq = self._next_seq
        self._next_seq += 1
        job.created_at = self._reactor.seconds()
        job.state = JobState.QUEUED

        def stored(_: None) -> Job:
            self._store_ok()
            self._jobs[job.id] = job
            self._enqueue(job)
            self._notify(job)
            self._schedule()
            return job

        def notStored(f: Failure) -> Failure:
            _log.failure("could not store new job {job_id}", f, job_id=job.id)
            self._store_failed(f.value)
            _remove(self.job_dir(job.id))
            return f

        return _maybe_deferred(self._store.save, job).addCallbacks(stored, notStored)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, state: JobState | None = None, owner: str | None = None) -> list[Job]:
        """The jobs with C{state} and C{owner} (when given), newest first."""
        found = [
            j
            for j in self._jobs.values()
            if (state is None or j.state is state) and (owner is None or j.owner == owner)
        ]
        found.sort(key=lambda j: j.seq, reverse=True)
        return found

    def cancel(self, job_id: str) -> Deferred[Job | None]:
        """
        Cancel a job: a queued one leaves the queue; a running one's encoder is
        stopped and the Deferred fires once it has ended.  A finished job is
        left as it is.  Fires with C{None} for an unknown job.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return succeed(None)
        run = self._running.get(job_id)
        if run is not None:
            ended: Deferred[Job] = Deferred()
            run.ended.append(ended)
            if not run.cancel_requested:
                run.cancel_requested = True
                if run.execution is not None:
                    _cancel_execution(run)
            return _widen(ended)
        if job.state is JobState.QUEUED:
            self._queued.discard(job_id)
            return _widen(self._finish(job, JobState.CANCELLED))
        return succeed(job)

    def delete(self, job_id: str) -> Deferred[bool]:
        """Cancel the job if it has not finished, then remove its files and record."""
        return Deferred.fromCoroutine(self._delete(job_id))

    def changed(self, job_id: str) -> Deferred[Job]:
        """
        Fire with the job at its next change of state or progress, or when it is
        deleted.  Cancel the Deferred to stop waiting.

        @raise KeyError: (in the Deferred) for an unknown job.
        """
        if job_id not in self._jobs:
            return fail(KeyError(job_id))

        def forget(d: Deferred[Job]) -> None:
            waiting = self._waiters.get(job_id, [])
            if d in waiting:
                waiting.remove(d)
            if not waiting:
                self._waiters.pop(job_id, None)

        d: Deferred[Job] = Deferred(forget)
        self._waiters.setdefault(job_id, []).append(d)
        return d

    def subscribe(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call C{callback} with each job that changes; returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # -- recovery ----------------------------------------------------------

    def _recover(self) -> None:
        _empty(self.uploads_dir)
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        stored = self._store.load()
        known = {job.id for job in stored}
        for entry in self._jobs_dir.iterdir():
            if entry.name not in known:
                _log.info("removing {path}: no stored job owns it", path=str(entry))
                _remove(entry)
        # What runs now, read once for every unfinished job's leftovers.
        processes: list[_Process] | None = None
        for job in stored:
            self._jobs[job.id] = job
            self._next_seq = max(self._next_seq, job.seq + 1)
            if job.state.finished:
                continue
            if processes is None:
                processes = _processes()
            job_dir = self.job_dir(job.id)
            # The pid reaches the store just after the spawn (and RUNNING just
            # before it), so a server killed in between left an encoder that
            # only its working directory tells of, even for a job stored QUEUED.
            groups = set(_groups_working_in(job_dir, processes))
            if job.pid is not None:
                groups.add(job.pid)
            for pgid in sorted(groups):
                _stop_leftover_encoder(pgid, job_dir, job.id)
            _stop_leftover_probes(job_dir, job.id, processes)
            if job.state is JobState.RUNNING:
                _remove_partials(job_dir)
                _reset(job)
                _log.info(
                    "job {job_id} was running when the server stopped; queued again", job_id=job.id
                )
                self._persist(job)
            if not job_dir.is_dir():
                self._finish(job, JobState.FAILED, error="the job's files are missing")
            else:
                self._enqueue(job)

    # -- scheduling --------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        self._queued.add(job.id)
        heapq.heappush(self._queue, (job.seq, job.id))

    def _pop_queued(self) -> Job | None:
        while self._queue:
            _, job_id = heapq.heappop(self._queue)
            if job_id in self._queued:
                self._queued.discard(job_id)
                return self._jobs[job_id]
        return None

    def _schedule(self) -> None:
        # A job that ends at once (an encoder that cannot start) calls back in
        # here; the outer loop picks up its free slot instead of recursing.
        if self._scheduling:
            return
        self._scheduling = True
        try:
            while (
                self._started
                and not self._stopping
                and self.store_error is None
                and len(self._running) < self._workers
            ):
                job = self._pop_queued()
                if job is None:
                    break
                try:
                    self._start_job(job)
                except Exception:
                    _log.failure("could not start job {job_id}", job_id=job.id)
                    self._running.pop(job.id, None)
                    if not job.state.finished:
                        self._finish(job, JobState.FAILED, error="internal error starting the job")
        finally:
            self._scheduling = False

    def _start_job(self, job: Job) -> None:
        profile = self._profiles.get(job.profile)
        if profile is None:
            self._finish(
                job,
                JobState.FAILED,
                error=f"profile {job.profile!r} no longer exists on this server",
            )
            return
        now = self._reactor.seconds()
        _reset(job)
        job.state = JobState.RUNNING
        job.started_at = now
        run = _Run(job, last_saved=now)
        self._running[job.id] = run
        self._persist(job)
        self._notify(job)
        job_dir = self.job_dir(job.id)
        try:
            execution = self._executor(
                self._reactor,
                job_dir=job_dir,
                profile=profile,
                inputs={i.name: job_dir / i.path for i in job.inputs},
                params=job.params,
                timeout=profile.timeout if profile.timeout is not None else self._job_timeout,
                on_progress=lambda percent: self._on_progress(run, percent),
                on_spawn=lambda pid: self._on_spawn(run, pid),
                kill_grace=self._kill_grace,
                max_input_duration=self._max_input_duration,
            )
        except Exception:
            _log.failure("could not start the encoder for job {job_id}", job_id=job.id)
            self._ended(
                _InternalOutcome(JobState.FAILED, error="the encoder could not be started"), run
            )
            return
        run.execution = execution
        if run.cancel_requested or run.requeue:
            # Asked for while the executor was being called.
            _cancel_execution(run)
        execution.deferred.addCallbacks(
            self._ended, self._ended_badly, callbackArgs=(run,), errbackArgs=(run,)
        )

    def _on_spawn(self, run: _Run, pid: int) -> None:
        if self._running.get(run.job.id) is not run:
            return
        run.job.pid = pid
        # Without the pid on disk, a restarted server could not stop this encoder.
        self._persist(run.job)

    def _on_progress(self, run: _Run, percent: float) -> None:
        job = run.job
        if self._running.get(job.id) is not run or math.isnan(percent):
            return
        # 100 is the state change's to set, with the job's end: a long-poll
        # woken by an executor's last report must not see 100 and "running".
        percent = min(RUNNING_MAX_PROGRESS, max(0.0, float(percent)))
        if percent == job.progress:
            return
        whole_percent_changed = int(percent) != int(job.progress)
        job.progress = percent
        # Long-polls wake on whole percents: encoders report many times a
        # second, and each wake-up is an HTTP answer.
        if whole_percent_changed:
            self._notify(job)
        if run.flush_call is not None:
            return
        wait = run.last_saved + PROGRESS_SAVE_INTERVAL - self._reactor.seconds()
        if wait <= 0:
            self._save_progress(run)
        else:
            run.flush_call = self._reactor.callLater(wait, self._save_progress, run)

    def _save_progress(self, run: _Run) -> None:
        run.flush_call = None
        if self._running.get(run.job.id) is run:
            run.last_saved = self._reactor.seconds()
            self._persist(run.job)

    def _ended_badly(self, failure: Failure, run: _Run) -> None:
        _log.failure("the execution of job {job_id} failed", failure, job_id=run.job.id)
        self._ended(
            _InternalOutcome(JobState.FAILED, error="internal error running the encoder"), run
        )

    def _ended(self, outcome: _Outcome, run: _Run) -> None:
        job = run.job
        try:
            if self._running.get(job.id) is run:
                del self._running[job.id]
            if run.flush_call is not None:
                if run.flush_call.active():
                    run.flush_call.cancel()
                run.flush_call = None
            job.pid = None
            now = self._reactor.seconds()
            if outcome.state is JobState.SUCCEEDED or not (run.cancel_requested or run.requeue):
                # A result that made it before the signal is kept.
                saved = self._record(job, lambda j: self._record_end(j, now, outcome))
            elif run.cancel_requested:
                ended = _InternalOutcome(JobState.CANCELLED)
                saved = self._record(job, lambda j: self._record_end(j, now, ended))
            else:
                _remove_partials(self.job_dir(job.id))
                _reset(job)
                saved = self._persist(job).addCallback(lambda _: job)
                self._notify(job)
        except Exception:
            _log.failure("error recording the end of job {job_id}", job_id=job.id)
            saved = succeed(job)
        finally:
            self._schedule()

        def release(_: Job) -> None:
            for d in run.ended:
                d.callback(job)

        saved.addCallback(release)

    def _record_end(self, job: Job, now: float, outcome: _Outcome) -> None:
        state = outcome.state
        error = outcome.error
        if not state.finished:
            error = f"the encoder ended in state {state.value}"
            state = JobState.FAILED
        if job.started_at is not None and state is not JobState.CANCELLED:
            took = now - job.started_at
            self._mean_run = took if self._mean_run is None else 0.8 * self._mean_run + 0.2 * took
        job.state = state
        job.finished_at = now
        job.output = outcome.output
        job.exit_code = outcome.exit_code
        job.error = error
        job.log_tail = outcome.log_tail
        if state is JobState.SUCCEEDED:
            job.progress = 100.0

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> Deferred[Job]:
        """End a job that is not running."""
        if state is JobState.FAILED:
            _log.warn("job {job_id} failed: {error}", job_id=job.id, error=error)
        now = self._reactor.seconds()

        def end(j: Job) -> None:
            j.state = state
            j.error = error
            j.finished_at = now

        return self._record(job, end)

    # -- stopping and deleting ---------------------------------------------

    async def _stop(self) -> None:
        if self._store_check is not None and self._store_check.active():
            self._store_check.cancel()
        self._store_check = None
        ended: list[Deferred[Job]] = []
        for run in list(self._running.values()):
            run.requeue = True
            d: Deferred[Job] = Deferred()
            run.ended.append(d)
            ended.append(d)
            if run.execution is not None:
                _cancel_execution(run)
        await gatherResults(ended)
        await self._store.close()

    async def _delete(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if not job.state.finished:
            await self.cancel(job_id)
        if self._jobs.get(job_id) is not job:
            # Another delete won while this one waited for the encoder.
            return False
        del self._jobs[job_id]
        self._queued.discard(job_id)
        _remove(self.job_dir(job_id))
        try:
            await _maybe_deferred(self._store.delete, job_id)
        except Exception:
            _log.failure("could not delete job {job_id} from the store", job_id=job_id)
        for d in self._waiters.pop(job_id, []):
            d.callback(job)
        return True

    # -- helpers -----------------------------------------------------------

    def _persist(self, job: Job) -> Deferred[None]:
        """Write C{job} through to the store; a failure is logged, never raised."""

        def failed(f: Failure) -> None:
            _log.failure("could not store job {job_id}", f, job_id=job.id)
            self._store_failed(f.value)

        return _maybe_deferred(self._store.save, job).addCallbacks(
            lambda _: self._store_ok(), failed
        )

    def _record(self, job: Job, change: Callable[[Job], None]) -> Deferred[Job]:
        """
        Apply C{change} (a job's end) to C{job} once the store has recorded it.

        Until then clients see the job as it was: a state they saw must
        survive a restart.  Each write is tried again after a pause; when
        L{_RECORD_RETRIES} are used up, the job is recorded as failed for the
        store's sake instead, its result removed (space back on a full disk
        is what most often lets the next write through), and that is tried
        until it is written.  A stopping registry gives up: the job keeps its
        stored state and runs again at the next start.
        """
        return Deferred.fromCoroutine(self._record_until_stored(job, change))

    async def _record_until_stored(self, job: Job, change: Callable[[Job], None]) -> Job:
        draft = Job.from_record(job.to_record())
        change(draft)
        failures = 0
        while True:
            try:
                await _maybe_deferred(self._store.save, draft)
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
                self._store_failed(e)
                failures += 1
                if failures == len(_RECORD_RETRIES) + 1:
                    draft = Job.from_record(job.to_record())
                    _store_failure(draft, self._reactor.seconds(), e)
                    _remove_results(self.job_dir(job.id))
                pause = _RECORD_RETRIES[failures - 1] if failures <= len(_RECORD_RETRIES) else None
                await deferLater(self._reactor, pause or STORE_RECHECK, lambda: None)
                if self._stopping or self._jobs.get(job.id) is not job:
                    # Stopping, or deleted meanwhile: nothing to show it to.
                    return job
                continue
            self._store_ok()
            for name in _JOB_FIELDS:
                setattr(job, name, getattr(draft, name))
            self._notify(job)
            return job

    def _store_failed(self, error: BaseException | None) -> None:
        if self.store_error is None:
            _log.error(
                "the job store failed ({error}): no job starts and no upload is taken "
                "until it takes writes again",
                error=str(error),
            )
        self.store_error = str(error) or type(error).__name__
        if self._store_check is None and not self._stopping:
            self._store_check = self._reactor.callLater(STORE_RECHECK, self._check_store)

    def _store_ok(self) -> None:
        if self.store_error is None:
            return
        _log.info("the job store takes writes again")
        self.store_error = None
        if self._store_check is not None and self._store_check.active():
            self._store_check.cancel()
        self._store_check = None
        self._schedule()

    def _check_store(self) -> None:
        self._store_check = None
        if self.store_error is None or self._stopping:
            return

        def failed(f: Failure) -> None:
            self._store_failed(f.value)

        _maybe_deferred(lambda _: self._store.check(), None).addCallbacks(
            lambda _: self._store_ok(), failed
        )

    def _notify(self, job: Job) -> None:
        for d in self._waiters.pop(job.id, []):
            d.callback(job)
        for callback in list(self._subscribers):
            try:
                callback(job)
            except Exception:
                _log.failure("job subscriber {callback!r} failed", callback=callback)

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely to free: one run spread over the workers."""
        if self._mean_run is None:
            return _DEFAULT_RETRY_AFTER
        return min(600, max(1, math.ceil(self._mean_run / self._workers)))


def _shutting_down() -> Unavailable:
    return Unavailable(
        "shutting_down", "the server is shutting down; try again shortly", _DEFAULT_RETRY_AFTER
    )


_JOB_FIELDS = tuple(f.name for f in fields(Job))


def _store_failure(job: Job, now: float, error: BaseException) -> None:
    """C{job} failed because its end could not be recorded."""
    job.state = JobState.FAILED
    job.error = f"the server could not record this job's outcome: {error}"
    job.finished_at = now
    job.output = None
    job.progress = min(job.progress, RUNNING_MAX_PROGRESS)


def _reset(job: Job) -> None:
    """Back to a fresh queued job, as if it had never run."""
    job.state = JobState.QUEUED
    job.progress = 0.0
    job.started_at = None
    job.finished_at = None
    job.output = None
    job.exit_code = None
    job.error = None
    job.log_tail = None
    job.pid = None


def _cancel_execution(run: _Run) -> None:
    assert run.execution is not None
    try:
        run.execution.cancel()
    except Exception:
        _log.failure("could not cancel the encoder of job {job_id}", job_id=run.job.id)


def _maybe_deferred(f: Callable[[Any], Deferred[None]], arg: Any) -> Deferred[None]:
    try:
        return f(arg)
    except Exception:
        return fail()


def _widen(d: Deferred[Job]) -> Deferred[Job | None]:
    def optional(job: Job) -> Job | None:
        return job

    return d.addCallback(optional)


def _chain_to(target: Deferred[None]) -> Callable[[Any], Any]:
    def chain(result: Any) -> Any:
        if isinstance(result, Failure):
            target.errback(result)
        else:
            target.callback(None)
        return result

    return chain


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        _log.failure("could not remove {path}", path=str(path))


def _empty(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        _log.info("removing {path}: an upload that never finished", path=str(entry))
        _remove(entry)


def _remove_results(job_dir: Path) -> None:
    if job_dir.is_dir():
        for result in job_dir.glob("result.*"):
            _remove(result)


def _remove_partials(job_dir: Path) -> None:
    if job_dir.is_dir():
        for partial in job_dir.glob("result.partial.*"):
            _remove(partial)


# -- leftover encoders ------------------------------------------------------


def _stop_leftover_encoder(pid: int, job_dir: Path, job_id: str) -> None:
    """
    Stop the process group C{pid} if it is still the encoder of the job in C{job_dir}.

    Encoders run in their own session, so they outlive a server killed with
    SIGKILL.  Start-up is the only time this runs, so a short blocking wait is fine.
    """
    if not _is_encoder_of(pid, job_dir):
        return
    _log.warn("stopping leftover encoder {pid} of job {job_id}", pid=pid, job_id=job_id)
    for sig, wait in ((signal.SIGTERM, _RECOVERY_GRACE), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            _log.error("not allowed to stop leftover encoder {pid}", pid=pid)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.02)
    _log.error("leftover encoder {pid} of job {job_id} survived SIGKILL", pid=pid, job_id=job_id)


@dataclass(frozen=True)
class _Process:
    pid: int
    cwd: str | None
    argv: list[bytes]


def _processes() -> list[_Process]:
    """Every process but this one, with its working directory and argv where readable."""
    found = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd: str | None = os.readlink(entry / "cwd")
        except OSError:
            cwd = None
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            argv = []
        found.append(_Process(int(entry.name), cwd, argv))
    return found


def _stop_leftover_probes(job_dir: Path, job_id: str, processes: list[_Process]) -> None:
    """
    Kill the ffprobe runs a killed server left on the job's inputs.  They run
    in the server's directory and process group (which may be this server's
    too, when one shell started both), so they are found by the C{file:}
    argument that names an input, and killed one by one.  A probe has no
    children and nothing to save.
    """
    # As probe.probe names it (absolute), and as the kernel would (resolved).
    targets = {b"file:" + os.fsencode(p) + b"/" for p in (job_dir.absolute(), job_dir.resolve())}
    for process in processes:
        if any(arg.startswith(t) for arg in process.argv for t in targets):
            _log.warn(
                "stopping leftover probe {pid} of job {job_id}", pid=process.pid, job_id=job_id
            )
            try:
                os.kill(process.pid, signal.SIGKILL)
            except OSError:
                pass


def _groups_working_in(job_dir: Path, processes: list[_Process]) -> list[int]:
    """Process groups (other than ours) with a process whose working directory is C{job_dir}."""
    target = os.path.realpath(job_dir)
    ours = os.getpgrp()
    found: set[int] = set()
    for process in processes:
        if process.cwd != target:
            continue
        try:
            pgid = os.getpgid(process.pid)
        except OSError:
            continue
        if pgid != ours:
            found.add(pgid)
    return sorted(found)


def _is_encoder_of(pid: int, job_dir: Path) -> bool:
    """Whether process C{pid} works in C{job_dir} or names it: a pid alone may have been reused."""
    proc = Path("/proc") / str(pid)
    target = os.path.realpath(job_dir)
    try:
        if os.readlink(proc / "cwd") == target:
            return True
    except OSError:
        pass
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = os.fsencode(target)
    return any(arg == name or arg.startswith(name + b"/") for arg in argv)


def _group_alive(pgid: int) -> bool:
    """Whether any process of group C{pgid} still runs (zombies only wait to be reaped)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False

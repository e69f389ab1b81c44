"""
The job registry: the in-memory authority over jobs.

Every job lives in memory, so reads never wait; each change is written through
to an L{IJobStore} (L{transcoder.core.storewriter}).  Queued jobs run in FIFO
order, at most C{workers} at once.  After a crash, L{JobRegistry.start} stops
encoders that outlived the previous server (L{transcoder.core.recovery}) and
puts their jobs back in the queue.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transcoder.core import recovery
from transcoder.core.errors import Unavailable
from transcoder.core.events import JobEvents
from transcoder.core.executor import Ended, Executor, Outcome, Run, default_executor
from transcoder.core.files import empty_uploads, remove, remove_partials
from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import RUNNING_MAX_PROGRESS, IJobStore, Job, JobState, is_job_id
from transcoder.core.profiles import Profile
from transcoder.core.storewriter import StoreWriter, call_store

_log = Logger()

# Progress alone is written to the store at most this often per job.
PROGRESS_SAVE_INTERVAL = 1.0
# Retry-After for a full queue before any job has finished to measure by.
_DEFAULT_RETRY_AFTER = 30
# Free space in the data dir below which no upload is taken and no encoder
# runs: what the job store needs to record the states of the jobs in flight.
STORE_HEADROOM = 1 << 20


@implementer(IJobSource)
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
        if workers < 0:
            raise ValueError("workers must be at least 0")
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
        self._executor = executor if executor is not None else default_executor()
        self._max_input_duration = max_input_duration

        self._jobs: dict[str, Job] = {}
        # A heap of (seq, id); ids no longer in _queued are skipped when popped.
        self._queue: list[tuple[int, str]] = []
        self._queued: set[str] = set()
        self._running: dict[str, Run] = {}
        self._events = JobEvents()
        self._next_seq = 1
        self._mean_run: float | None = None
        self._started = False
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._scheduling = False
        self._writer = StoreWriter(reactor, store, on_recovered=self._schedule, on_lost=self._lost)

    # -- public surface ----------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self._jobs_dir / job_id

    @property
    def store_error(self) -> str | None:
        """Why the store's last write failed, until one succeeds again: no job
        starts and no upload is taken meanwhile."""
        return self._writer.error

    @property
    def workers(self) -> int:
        """How many encoders this node runs at once (0: none)."""
        return self._workers

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
        job.created_at = self._reactor.seconds()
        job.state = JobState.QUEUED

        def stored(_: object) -> Job:
            self._writer.ok()
            self._jobs[job.id] = job
            self._enqueue(job)
            self._events.changed(job)
            self._schedule()
            return job

        def not_stored(f: Failure) -> Failure:
            _log.failure("could not store new job {job_id}", f, job_id=job.id)
            self._writer.failed(f.value)
            remove(self.job_dir(job.id))
            return f

        return self._store_new(job).addCallbacks(stored, not_stored)

    def _store_new(self, job: Job) -> Deferred[Any]:
        """Number a new job and store it (a cluster's store numbers it itself)."""
        job.seq = self._next_seq
        self._next_seq += 1
        return call_store(self._store.save, job)

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
                    run.cancel()
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
        return self._events.next_change(job_id)

    def subscribe(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call C{callback} with each job that changes; returns a function that unsubscribes."""
        return self._events.subscribe(callback)

    def exclusive_sweep(self) -> Deferred[Callable[[], Deferred[None]] | None]:
        """The right to sweep old jobs: always this server's, as it is alone."""
        return succeed(lambda: succeed(None))

    # -- recovery ----------------------------------------------------------

    def _recover(self) -> None:
        empty_uploads(self.uploads_dir)
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        stored = self._store.load()
        recovery.remove_unowned(self._jobs_dir, {job.id for job in stored})
        # What runs now, read once for every unfinished job's leftovers.
        processes: list[recovery.Process] | None = None
        for job in stored:
            self._jobs[job.id] = job
            self._next_seq = max(self._next_seq, job.seq + 1)
            if job.state.finished:
                continue
            if processes is None:
                processes = recovery.processes()
            job_dir = self.job_dir(job.id)
            recovery.stop_leftovers(job_dir, job.id, job.pid, processes)
            if job.state is JobState.RUNNING:
                remove_partials(job_dir)
                _reset(job)
                _log.info(
                    "job {job_id} was running when the server stopped; queued again", job_id=job.id
                )
                self._writer.persist(job)
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
        run = Run(job, last_saved=now)
        self._running[job.id] = run
        self._writer.persist(job)
        self._events.changed(job)
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
                # One node (attempt 0) keeps the executor's default names.
                **({"attempt": job.attempt} if job.attempt else {}),
            )
        except Exception:
            _log.failure("could not start the encoder for job {job_id}", job_id=job.id)
            self._ended(Ended(JobState.FAILED, error="the encoder could not be started"), run)
            return
        run.execution = execution
        if run.cancel_requested or run.requeue:
            # Asked for while the executor was being called.
            run.cancel()
        execution.deferred.addCallbacks(
            self._ended, self._ended_badly, callbackArgs=(run,), errbackArgs=(run,)
        )

    def _on_spawn(self, run: Run, pid: int) -> None:
        if self._running.get(run.job.id) is not run:
            return
        run.job.pid = pid
        # Without the pid on disk, a restarted server could not stop this encoder.
        self._writer.persist(run.job)

    def _on_progress(self, run: Run, percent: float) -> None:
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
            self._events.changed(job)
        if run.flush_call is not None:
            return
        wait = run.last_saved + PROGRESS_SAVE_INTERVAL - self._reactor.seconds()
        if wait <= 0:
            self._save_progress(run)
        else:
            run.flush_call = self._reactor.callLater(wait, self._save_progress, run)

    def _save_progress(self, run: Run) -> None:
        run.flush_call = None
        if self._running.get(run.job.id) is run:
            run.last_saved = self._reactor.seconds()
            self._writer.persist(run.job)

    def _ended_badly(self, failure: Failure, run: Run) -> None:
        _log.failure("the execution of job {job_id} failed", failure, job_id=run.job.id)
        self._ended(Ended(JobState.FAILED, error="internal error running the encoder"), run)

    def _ended(self, outcome: Outcome, run: Run) -> None:
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
                ended = Ended(JobState.CANCELLED)
                saved = self._record(job, lambda j: self._record_end(j, now, ended))
            else:
                saved = self._give_back(job).addCallback(lambda _: job)
                self._events.changed(job)
        except Exception:
            _log.failure("error recording the end of job {job_id}", job_id=job.id)
            saved = succeed(job)
        finally:
            self._schedule()

        def release(_: Job) -> None:
            for d in run.ended:
                d.callback(job)

        saved.addCallback(release)

    def _record_end(self, job: Job, now: float, outcome: Outcome) -> None:
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
        job.output, job.outputs = outcome.output, list(outcome.outputs)
        job.describe_inputs(outcome.inputs_media)
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
        self._writer.stop()
        await self._requeue_running()
        await self._store.close()

    async def _requeue_running(self) -> None:
        """Stop every encoder, its job going back to the queue; return once all have ended."""
        ended: list[Deferred[Job]] = []
        for run in list(self._running.values()):
            run.requeue = True
            d: Deferred[Job] = Deferred()
            run.ended.append(d)
            ended.append(d)
            if run.execution is not None:
                run.cancel()
        await gatherResults(ended)

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
        remove(self.job_dir(job_id))
        try:
            await call_store(self._store.delete, job_id)
        except Exception:
            _log.failure("could not delete job {job_id} from the store", job_id=job_id)
        self._events.deleted(job)
        return True

    def _give_back(self, job: Job) -> Deferred[None]:
        """Put a job whose run this server stopped back in the queue, as if it had never run."""
        remove_partials(self.job_dir(job.id))
        _reset(job)
        return self._writer.persist(job)

    def _lost(self, job: Job) -> None:
        """A write about C{job} was refused: another node holds it now (only with several)."""

    def _record(self, job: Job, change: Callable[[Job], None]) -> Deferred[Job]:
        """
        Apply C{change} (a job's end) to C{job} once the store has recorded it
        (L{StoreWriter.record}), and tell the waiters and subscribers.
        """

        def shown(changed: bool) -> Job:
            if changed:
                self._events.changed(job)
            return job

        # Stopping, or deleted meanwhile: nothing to show it to.
        def abandoned() -> bool:
            return self._stopping or self._jobs.get(job.id) is not job

        return self._writer.record(job, change, self.job_dir(job.id), abandoned).addCallback(shown)

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely to free: one run spread over the workers."""
        if self._mean_run is None:
            return _DEFAULT_RETRY_AFTER
        return min(600, max(1, math.ceil(self._mean_run / max(1, self._workers))))


def _shutting_down() -> Unavailable:
    return Unavailable(
        "shutting_down", "the server is shutting down; try again shortly", _DEFAULT_RETRY_AFTER
    )


def _reset(job: Job) -> None:
    """Back to a fresh queued job, as if it had never run."""
    job.state = JobState.QUEUED
    job.progress = 0.0
    job.started_at = None
    job.finished_at = None
    job.output, job.outputs = None, []
    job.exit_code = None
    job.error = None
    job.log_tail = None
    job.pid = None


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

"""
The job registry of one node among several sharing a PostgreSQL store
(L{IClusterStore}) and a data dir.

The store, not this process, is the authority.  The registry keeps a copy of
the whole jobs table, so that status reads never wait on the database: it is
read once at start, then kept by the store's notifications, each of which
carries the changed row (or only its id, when the row is too big for one, and
then the row is read), and the whole table is read again whenever the LISTEN
connection was (re)established, since notifications may have been lost meanwhile.  Changes
made on other nodes wake this node's long-polls, but not its subscribers
(webhooks, metrics): those hear of a job from the node that ran it.

Queued jobs are claimed from the store (woken by a notification, and every
L{POLL_INTERVAL} seconds in case one was lost), at most C{workers} at once;
leases are renewed every third of the lease; expired leases are requeued by
whichever node notices.  A write about a running job that the store refuses
(L{LostJob}: another node or a later attempt holds it) stops this node's
encoder and forgets the run.  A cancel asked on any node reaches the node
running the job through the store's C{cancel_requested}.

A node that cannot renew its leases for half a lease (the database is gone)
stops its encoders, as their jobs will be requeued elsewhere, and takes no
upload and claims nothing until a test write succeeds again.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core import recovery
from transcoder.core.executor import Outcome, Run
from transcoder.core.files import remove_attempt
from transcoder.core.jobs import Job, JobChange, JobState, LostJob
from transcoder.core.pgside import RETENTION_LOCK
from transcoder.core.registry import JobRegistry

_log = Logger()

# Seconds between looks for queued jobs and expired leases when no
# notification came.
POLL_INTERVAL = 2.0
# How long a cancel asked on this node waits for the node running the job.
REMOTE_CANCEL_WAIT = 30.0

_JOB_FIELDS = tuple(f.name for f in fields(Job))


class ClusterRegistry(JobRegistry):
    """
    L{JobRegistry} for one node of several: claims instead of a local queue.

    @ivar node: this node's name in the store.
    """

    def __init__(
        self,
        reactor: Any,
        store: Any,
        *args: Any,
        node: str,
        lease: float,
        max_attempts: int,
        side: Any = None,
        **kwargs: Any,
    ) -> None:
        """
        @param side: the L{SideDatabase} whose advisory lock lets one node
            at a time sweep old jobs (L{exclusive_sweep}); without it, each
            node sweeps as if it were alone.
        """
        super().__init__(reactor, store, *args, **kwargs)
        self._side = side
        self._cluster: Any = store
        self.node = node
        self._lease = lease
        self._max_attempts = max_attempts
        self._claiming = False
        self._lost_runs: set[int] = set()
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = reactor
        self._poller = LoopingCall(self._poll)
        self._poller.clock = reactor
        self._stop_listening: Callable[[], None] | None = None
        # Fires half a lease after the last renewal that reached the database.
        self._unreachable: IDelayedCall | None = None

    @property
    def queued_count(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state is JobState.QUEUED)

    def register(self, workers: int) -> None:
        """
        Record this node in the store (blocking: at start-up).

        @raise transcoder.core.jobs.NodeNameTaken: a live node has this name.
        """
        self._cluster.register_node_now(self.node, workers, self._lease)

    def nodes(self) -> Deferred[list[dict[str, Any]]]:
        """The live nodes, as the store has them."""
        result: Deferred[list[dict[str, Any]]] = self._cluster.nodes(self._lease)
        return result

    # -- start and stop ----------------------------------------------------

    def _recover(self) -> None:
        # uploads/ and jobs/ are shared: what looks abandoned may be another
        # node's upload under way, so nothing there is removed at start.
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        processes: list[recovery.Process] | None = None
        for job, _ in self._cluster.snapshot_now():
            self._jobs[job.id] = job
            if job.state is JobState.RUNNING and job.node == self.node:
                # This node's previous process died with the job: stop what
                # it left running here, then give the job back to the queue.
                if processes is None:
                    processes = recovery.processes()
                recovery.stop_leftovers(self.job_dir(job.id), job.id, job.pid, processes)
                _log.info(
                    "job {job_id} was running here when this node stopped; queued again",
                    job_id=job.id,
                )
                _requeue(job)
                self._writer.persist(job)
        self._stop_listening = self._cluster.listen(self._changed_in_store)
        self._renewer.start(self._lease / 3, now=True)
        self._poller.start(POLL_INTERVAL, now=False)

    async def _stop(self) -> None:
        for call in (self._renewer, self._poller):
            if call.running:
                call.stop()
        if self._unreachable is not None and self._unreachable.active():
            self._unreachable.cancel()
        if self._stop_listening is not None:
            self._stop_listening()
        self._writer.stop()
        await self._requeue_running()
        try:
            await self._cluster.unregister_node(self.node)
        except Exception:
            _log.failure("could not remove node {node} from the store", node=self.node)
        await self._store.close()

    # -- adding and cancelling ---------------------------------------------

    def _store_new(self, job: Job) -> Deferred[Any]:
        # The store numbers it, from a sequence every node shares.
        d: Deferred[Any] = self._cluster.insert(job)
        return d

    def _enqueue(self, job: Job) -> None:
        """Nothing: the queue is the store's, and whichever node claims a job takes it there."""

    def cancel(self, job_id: str) -> Deferred[Job | None]:
        job = self._jobs.get(job_id)
        if job is None or job_id in self._running:
            return super().cancel(job_id)
        if job.state.finished:
            return succeed(job)
        return Deferred.fromCoroutine(self._cancel_elsewhere(job))

    async def _cancel_elsewhere(self, job: Job) -> Job | None:
        outcome = await self._cluster.cancel(job.id, self._reactor.seconds())
        if outcome == "missing":
            return None
        # The node running it stops its encoder and records the end; this copy
        # learns of it through the store's notification.
        if outcome != "requested":
            await self._refresh(job.id)
            return self._jobs.get(job.id)
        waited = 0.0
        while not job.state.finished and waited < REMOTE_CANCEL_WAIT:
            change = self._events.next_change(job.id)
            timer = self._reactor.callLater(1.0, change.cancel)
            try:
                await change
            except Exception:
                waited += 1.0
            else:
                if timer.active():
                    timer.cancel()
            if self._jobs.get(job.id) is not job:
                return None
        return job

    def exclusive_sweep(self) -> Deferred[Callable[[], Deferred[None]] | None]:
        if self._side is None:
            return super().exclusive_sweep()
        return Deferred.fromCoroutine(self._lock_sweep())

    async def _lock_sweep(self) -> Callable[[], Deferred[None]] | None:
        side = self._side
        if not await side.try_lock(RETENTION_LOCK):
            return None
        # The last sweep was perhaps another node's, whose deletions may not
        # have reached this copy yet: they would be deleted twice.
        await self._resync()

        def release() -> Deferred[None]:
            d: Deferred[bool] = side.unlock(RETENTION_LOCK)
            return d.addCallback(lambda _: None)

        return release

    # -- claims and leases -------------------------------------------------

    def _schedule(self) -> None:
        if (
            self._claiming
            or not self._started
            or self._stopping
            or self.store_error is not None
            or len(self._running) >= self._workers
        ):
            return
        self._claiming = True
        d: Deferred[Job | None] = self._cluster.claim(self.node, self._lease)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claimed(self, claimed: Job | None) -> None:
        self._claiming = False
        if claimed is None:
            return
        job = self._adopt(claimed)
        if self._stopping:
            self._give_back(job)
            return
        try:
            self._start_job(job)
        except Exception:
            _log.failure("could not start job {job_id}", job_id=job.id)
            self._running.pop(job.id, None)
            if not job.state.finished:
                self._finish(job, JobState.FAILED, error="internal error starting the job")
        self._schedule()

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = False
        _log.failure("could not claim a job", failure)

    def _adopt(self, stored: Job) -> Job:
        """The registry's copy of C{stored}, updated from it (the same object, for readers)."""
        job = self._jobs.get(stored.id)
        if job is None:
            self._jobs[stored.id] = stored
            return stored
        for name in _JOB_FIELDS:
            setattr(job, name, getattr(stored, name))
        return job

    def _renew(self) -> Deferred[None]:
        held = {job_id: run.job.attempt for job_id, run in self._running.items()}

        def renewed(still: dict[str, bool]) -> None:
            self._reached_database()
            for job_id, attempt in held.items():
                run = self._running.get(job_id)
                if run is None or run.job.attempt != attempt:
                    continue
                if job_id not in still:
                    self._lost(run.job)
                elif still[job_id]:
                    self._cancel_here(run)

        def failed(f: Failure) -> None:
            _log.failure("could not renew this node's leases", f)

        d: Deferred[dict[str, bool]] = self._cluster.renew(self.node, held, self._lease)
        return d.addCallback(renewed).addErrback(failed)

    def _reached_database(self) -> None:
        if self._stopping:
            return
        # A renewal is a write: the store takes writes again.
        self._writer.ok()
        if self._unreachable is not None and self._unreachable.active():
            self._unreachable.reset(self._lease / 2)
        else:
            self._unreachable = self._reactor.callLater(self._lease / 2, self._database_lost)

    def _database_lost(self) -> None:
        # The leases held here run out soon and their jobs go to other nodes:
        # the encoders stop now, before a second attempt writes beside them.
        self._unreachable = None
        self._writer.failed(
            ConnectionError(f"the job database did not answer for {self._lease / 2:g}s")
        )
        for run in list(self._running.values()):
            if id(run) in self._lost_runs:
                continue
            _log.warn(
                "job {job_id}: stopping its encoder, the job database cannot be reached",
                job_id=run.job.id,
            )
            self._lost_runs.add(id(run))
            run.requeue = True
            if run.execution is not None:
                run.cancel()
                # Nothing it makes is wanted now, and an encoder given TERM
                # may flush for seconds: no grace.  Still unreaped, so the
                # group is still this node's child's.
                pgid = getattr(run.execution, "pid", None)
                if pgid is not None:
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except OSError:
                        pass

    def _poll(self) -> Deferred[None]:
        def requeued(ids: list[str]) -> None:
            for job_id in ids:
                self._refresh(job_id)
            self._schedule()

        def failed(f: Failure) -> None:
            _log.failure("could not look for expired leases", f)

        d: Deferred[list[str]] = self._cluster.requeue_expired(self._max_attempts)
        return d.addCallback(requeued).addErrback(failed)

    def _cancel_here(self, run: Run) -> None:
        if not run.cancel_requested:
            run.cancel_requested = True
            if run.execution is not None:
                run.cancel()

    def _give_back(self, job: Job) -> Deferred[None]:
        remove_attempt(self.job_dir(job.id), job.attempt)
        _requeue(job)

        def released(_: None) -> None:
            job.node = None
            job.attempt -= 1

        def failed(f: Failure) -> None:
            if f.check(LostJob):
                _log.warn("job {job_id} was no longer this node's to give back", job_id=job.id)
            else:
                # Its lease expires instead, which counts as an attempt.
                _log.failure("could not give job {job_id} back", f, job_id=job.id)

        d: Deferred[None] = self._cluster.release(job)
        return d.addCallbacks(released, failed)

    def _lost(self, job: Job) -> None:
        run = self._running.get(job.id)
        if run is None or run.job.attempt != job.attempt:
            if run is None and job.node == self.node and job.attempt:
                # The run ended before its end was refused (the job is the
                # refused draft): what that attempt wrote is nobody's now.
                remove_attempt(self.job_dir(job.id), job.attempt)
            return
        if id(run) in self._lost_runs:
            return
        _log.warn(
            "job {job_id} attempt {attempt} was taken from this node: stopping its encoder",
            job_id=job.id,
            attempt=job.attempt,
        )
        self._lost_runs.add(id(run))
        run.requeue = True
        if run.execution is not None:
            run.cancel()
            if run.job.pid is not None:
                # What it makes is thrown away, so it gets no grace (ffmpeg may
                # take seconds to flush after TERM): it only takes CPU from the
                # attempt that replaced it.  Not yet reaped, the group is ours.
                _kill_group(run.job.pid)

    def _ended(self, outcome: Outcome, run: Run) -> None:
        if id(run) not in self._lost_runs:
            super()._ended(outcome, run)
            return
        # Another node holds the job: nothing of this run is written, shown or kept.
        self._lost_runs.discard(id(run))
        job = run.job
        remove_attempt(self.job_dir(job.id), job.attempt)
        if self._running.get(job.id) is run:
            del self._running[job.id]
        if run.flush_call is not None and run.flush_call.active():
            run.flush_call.cancel()
        run.flush_call = None

        def release(_: object) -> None:
            for d in run.ended:
                d.callback(job)

        self._refresh(job.id).addBoth(release)
        self._schedule()

    # -- the copy of the table ---------------------------------------------

    def _changed_in_store(self, change: JobChange | None) -> None:
        if change is None:
            self._resync()
        elif change.carried:
            self._apply(change.job_id, change.found)
        else:
            self._refresh(change.job_id)

    def _refresh(self, job_id: str) -> Deferred[None]:
        def got(found: tuple[Job, bool] | None) -> None:
            self._apply(job_id, found)

        def failed(f: Failure) -> None:
            _log.failure("could not read job {job_id}", f, job_id=job_id)

        d: Deferred[tuple[Job, bool] | None] = self._cluster.get(job_id)
        return d.addCallbacks(got, failed)

    def _resync(self) -> Deferred[None]:
        def got(rows: list[tuple[Job, bool]]) -> None:
            seen = set()
            for job, cancel_requested in rows:
                seen.add(job.id)
                self._apply(job.id, (job, cancel_requested))
            for job_id in [i for i in self._jobs if i not in seen]:
                self._apply(job_id, None)

        def failed(f: Failure) -> None:
            _log.failure("could not read the jobs table", f)

        d: Deferred[list[tuple[Job, bool]]] = self._cluster.snapshot()
        return d.addCallbacks(got, failed)

    def _apply(self, job_id: str, found: tuple[Job, bool] | None) -> None:
        run = self._running.get(job_id)
        if run is not None:
            # This node's copy of a job it runs is the newer one; the store
            # only says whether it is still ours and whether to cancel it.
            if found is not None and found[0].attempt < run.job.attempt:
                # Read before this node's claim (a notification of the upload
                # answered late): it says nothing about this attempt.
                return
            if found is None or (found[0].node, found[0].attempt) != (self.node, run.job.attempt):
                self._lost(run.job)
            elif found[1]:
                self._cancel_here(run)
            return
        job = self._jobs.get(job_id)
        if found is None:
            if job is not None:
                del self._jobs[job_id]
                self._events.deleted(job)
            return
        stored = found[0]
        if job is not None and job.to_record() == stored.to_record():
            return
        job = self._adopt(stored)
        # Waiters only: subscribers (webhooks) hear from the node that ran it.
        self._events.deleted(job)
        if job.state is JobState.QUEUED:
            self._schedule()


def _requeue(job: Job) -> None:
    job.state = JobState.QUEUED
    job.progress = 0.0
    job.started_at = None
    job.pid = None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass

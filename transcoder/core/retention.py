"""
Retention: finished jobs, their files and their records are removed once
they are older than C{--keep-results}.

A L{LoopingCall} sweeps every C{interval} seconds (by default a tenth of
C{keep}, between 1 s and 5 minutes, so that a job goes at most 10 % late, or
5 minutes for a long C{keep}).  Queued and running jobs are
never touched.  Sweeps never overlap, on one server or across the nodes of a
cluster (L{IJobSource.exclusive_sweep}), and a failure is logged without
ending the loop.

With L{Tombstones}, each job is recorded as removed before it is removed, so
that the API can answer it with "expired" (410) rather than "no such job".
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import Job
from transcoder.core.tombstones import Tombstones

_log = Logger()


def _finished_since(job: Job) -> float | None:
    """When C{job} finished, or C{None} while it has not."""
    if not job.state.finished:
        return None
    # A finished job always has finished_at; a damaged record falls back to its creation.
    return job.finished_at if job.finished_at is not None else job.created_at


def default_interval(keep: float) -> float:
    """
    Seconds between sweeps for C{keep}: a tenth of it, at least 1 s (a sweep
    reads every job) and at most 5 minutes.  A job is removed by C{keep} plus
    this after it finished.
    """
    return min(300.0, max(1.0, keep / 10))


class RetentionSweeper:
    """
    Deletes finished jobs C{keep} seconds after they finished.

    @param reactor: the clock of the sweeps; the registry's times come from it too.
    @param registry: the job registry; L{start} this after the registry, so that
        the first sweep sees the jobs it recovered.
    @param keep: how long a finished job is kept, in seconds.
    @param interval: seconds between sweeps; by default L{default_interval}.
    @param tombstones: where removed jobs are recorded (and old records pruned).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        registry: IJobSource,
        *,
        keep: float,
        interval: float | None = None,
        tombstones: Tombstones | None = None,
    ) -> None:
        if keep < 0:
            raise ValueError("keep must not be negative")
        if interval is None:
            interval = default_interval(keep)
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._reactor = reactor
        self._registry = registry
        self._keep = keep
        self._interval = interval
        self._tombstones = tombstones
        self._loop: LoopingCall | None = None
        self._sweeping: Deferred[int] | None = None
        self._waiting: list[Deferred[int]] = []
        self._stopping = False

    def start(self) -> None:
        """Sweep now, then every C{interval} seconds."""
        if self._loop is not None:
            return
        self._stopping = False
        loop = self._loop = LoopingCall(self.sweep)
        loop.clock = self._reactor
        # sweep() never fails, so this only ends when the loop is stopped.
        loop.start(self._interval, now=True).addErrback(
            lambda f: _log.failure("the retention loop ended", f)
        )

    def stop(self) -> Deferred[None]:
        """Stop sweeping; fires once a sweep in progress has finished the deletion it was in."""
        self._stopping = True
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None
        if self._sweeping is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self.sweep().addCallback(lambda _: done.callback(None))
        return done

    def sweep(self) -> Deferred[int]:
        """
        Delete every job that finished at least C{keep} seconds ago; fires with
        how many were deleted.  While a sweep runs, a call waits for it and gets
        its result instead of starting another.
        """
        mine: Deferred[int] = Deferred()
        self._waiting.append(mine)
        if self._sweeping is None:
            self._sweeping = Deferred.fromCoroutine(self._sweep())
            # May run at once, when every deletion completes synchronously.
            self._sweeping.addBoth(self._swept)
        return mine

    def _swept(self, result: int | Failure) -> int:
        self._sweeping = None
        if isinstance(result, Failure):
            _log.failure("the retention sweep failed", result)
            result = 0
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)
        return result

    async def _sweep(self) -> int:
        release = await self._registry.exclusive_sweep()
        if release is None:
            # Another node sweeps now; it removes what is due here too.
            return 0
        try:
            return await self._sweep_held()
        finally:
            await release()

    async def _sweep_held(self) -> int:
        now = self._reactor.seconds()
        expired = [job.id for job in self._registry.jobs() if self._expired(job, now)]
        deleted = 0
        for job_id in expired:
            if self._stopping:
                break
            job = self._registry.get(job_id)
            # Checked again: a long sweep waits on each deletion, and the job may have gone.
            if job is None or not self._expired(job, now):
                continue
            self._bury(job, now)
            try:
                if await self._registry.delete(job_id):
                    deleted += 1
            except Exception:
                _log.failure("retention: could not delete job {job_id}", job_id=job_id)
        if self._tombstones is not None:
            try:
                self._tombstones.prune(now)
            except OSError:
                _log.failure("retention: could not prune the tombstones")
        if deleted:
            _log.info(
                "retention: deleted {count} jobs finished more than {keep}s ago",
                count=deleted,
                keep=self._keep,
            )
        return deleted

    def _bury(self, job: Job, now: float) -> None:
        """Record the job as expired, first: it answers so from the moment it is gone."""
        if self._tombstones is None:
            return
        try:
            self._tombstones.bury(job, now, self._keep)
        except OSError:
            # Removing it still frees the disk (which may be why this failed): it goes anyway.
            _log.failure("retention: could not record job {job_id} as expired", job_id=job.id)

    def _expired(self, job: Job, now: float) -> bool:
        since = _finished_since(job)
        return since is not None and since + self._keep <= now

"""
Who hears of a job's changes: long-polls waiting for one job's next change,
and subscribers to every change (webhooks, metrics).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from transcoder.core.jobs import Job

_log = Logger()


class JobEvents:
    """
    Tells waiters and subscribers of each change the registry makes.

    @ivar waiters: per job id, the Deferreds of those waiting for its next change.
    """

    def __init__(self) -> None:
        self.waiters: dict[str, list[Deferred[Job]]] = {}
        self._subscribers: list[Callable[[Job], None]] = []

    def next_change(self, job_id: str) -> Deferred[Job]:
        """Fire with the job at its next change; cancel the Deferred to stop waiting."""

        def forget(d: Deferred[Job]) -> None:
            waiting = self.waiters.get(job_id, [])
            if d in waiting:
                waiting.remove(d)
            if not waiting:
                self.waiters.pop(job_id, None)

        d: Deferred[Job] = Deferred(forget)
        self.waiters.setdefault(job_id, []).append(d)
        return d

    def subscribe(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call C{callback} with each job that changes; returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def changed(self, job: Job) -> None:
        """C{job} changed: tell its waiters, then every subscriber (whose errors are logged)."""
        self.deleted(job)
        for callback in list(self._subscribers):
            try:
                callback(job)
            except Exception:
                _log.failure("job subscriber {callback!r} failed", callback=callback)

    def deleted(self, job: Job) -> None:
        """C{job} is gone: its waiters hear of it (a subscriber watches jobs that exist)."""
        for d in self.waiters.pop(job.id, []):
            d.callback(job)

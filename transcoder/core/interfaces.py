"""
L{IJobSource}: the one small interface of the job registry that the services
around it (webhooks, metrics, retention) depend on, so that each can be given
a fake (L{transcoder.testing.FakeJobSource}) and none sees the registry's
scheduling.  The store the registry writes to is L{transcoder.core.jobs.IJobStore}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from transcoder.core.jobs import Job


class IJobSource(Interface):
    """The jobs a server holds, as those who watch them, count them and remove them see them."""

    def jobs() -> list[Job]:
        """Every job, newest first."""

    def get(job_id: str) -> Job | None:
        """The job C{job_id}, or C{None} when there is none."""

    def delete(job_id: str) -> Deferred[bool]:
        """
        Cancel the job if it has not finished, then remove its files and record.
        Fires with whether this call removed it.
        """

    def subscribe(callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call C{callback} with each job that changes; returns a function that unsubscribes."""

    def exclusive_sweep() -> Deferred[Callable[[], Deferred[None]] | None]:
        """
        Take the right to sweep (remove old jobs), which one node of several
        holds at a time; fires with the function that gives it back, or
        C{None} when another node sweeps now.  A single server always has it.
        """

    queued_count = Attribute("How many jobs wait for an encoder (an int).")
    running_count = Attribute("How many jobs have an encoder running (an int).")

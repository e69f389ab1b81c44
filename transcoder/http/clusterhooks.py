"""
Webhooks for a node of a cluster: deliveries live in the shared database
(L{PostgresWebhooks}), so that whichever node is alive sends them.

The node that ran a job adds its delivery right after recording its end,
then every node claims due deliveries every L{POLL_INTERVAL} seconds and
POSTs them as L{WebhookNotifier} does (same body, headers, signature and
backoff).  A failed attempt goes back to the table with its next due time,
for any node; the attempt count is the table's, so C{max_attempts} holds
across nodes and crashes.  Every L{SWEEP_EVERY} polls a node also adds the
deliveries of finished jobs that have none: their node died between
recording the end and adding it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import Job
from transcoder.core.pgwebhooks import DELIVERED, GIVEN_UP, Claimed, PostgresWebhooks
from transcoder.http.webhooks import WebhookNotifier, _Delivery, _for_log, callback_url_problem

_log = Logger()

# Seconds between looks for due deliveries.
POLL_INTERVAL = 1.0
# Polls between sweeps for finished jobs without a delivery.
SWEEP_EVERY = 10
# Deliveries in flight on one node at most.
_IN_FLIGHT = 16
# A claim outlasts an attempt's time limit by this much, so that no other
# node takes a delivery up while this one still waits for its answer.
_CLAIM_MARGIN = 2.0


class ClusterWebhookNotifier(WebhookNotifier):
    """
    L{WebhookNotifier} whose deliveries any node of the cluster makes.

    @param queue: the shared table of deliveries.
    @param node: this node's name, which holds its claims.
    """

    def __init__(
        self,
        reactor: Any,
        registry: IJobSource,
        *,
        queue: PostgresWebhooks,
        node: str,
        secret: bytes | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, registry, secret=secret, journal=None, **kwargs)
        self._queue = queue
        self._node = node
        self._loop = LoopingCall(self._poll)
        self._loop.clock = reactor
        self._polls = 0
        self._table_ready = False

    def start(self) -> None:
        super().start()
        if not self._loop.running:
            self._loop.start(POLL_INTERVAL, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        # Claims still held lapse; another node (or this one, restarted) takes them up.
        super().stop()

    # -- WebhookNotifier's hooks ---------------------------------------------

    def _begin(self, job: Job, url: str) -> None:
        d = self._add(job, url)
        if d is not None:
            # This node ran the job: it tries first, without waiting for its next poll.
            d.addCallback(lambda _: self._poll())

    def _keeps_pending(self) -> bool:
        return True

    def _record(self, delivery: _Delivery) -> None:
        # The claim counted the attempt in the table.
        pass

    def _settled(self, delivery: _Delivery, delivered: bool) -> None:
        outcome = DELIVERED if delivered else GIVEN_UP
        d = self._queue.settle(delivery.job_id, self._node, delivery.attempts, outcome)
        d.addCallbacks(lambda held: self._check_held(held, delivery), self._failed_write)

    def _retry_later(self, delivery: _Delivery, delay: float) -> None:
        # Out of this node's hands: the next attempt is whichever node's claims it first.
        self._deliveries.discard(delivery)
        d = self._queue.retry(delivery.job_id, self._node, delivery.attempts, delay)
        d.addCallbacks(lambda held: self._check_held(held, delivery), self._failed_write)

    # -- the table -----------------------------------------------------------

    def _add(self, job: Job, url: str) -> Deferred[None] | None:
        problem = callback_url_problem(url)
        if problem is not None:
            _log.warn("not calling back job {job_id}: its callback_url {problem}",
                      job_id=job.id, problem=problem)  # fmt: skip
            return None
        body = json.dumps(self._view(job), separators=(",", ":"))
        return Deferred.fromCoroutine(self._add_row(job.id, url, body))

    async def _add_row(self, job_id: str, url: str, body: str) -> None:
        try:
            await self._ensure_table()
            await self._queue.add(job_id, url, body, str(uuid.uuid4()))
        except Exception:
            # The sweep adds it later.
            _log.failure("could not queue the webhook of job {job_id}", job_id=job_id)

    async def _ensure_table(self) -> None:
        if not self._table_ready:
            # Twice at worst, when two calls meet: it is created if not there, under a lock.
            await self._queue.create()
            self._table_ready = True

    def _poll(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._poll_once())

    async def _poll_once(self) -> None:
        if self._unsubscribe is None:
            return
        try:
            await self._ensure_table()
            if self._polls % SWEEP_EVERY == 0:
                for job in await self._queue.missing(_IN_FLIGHT):
                    if job.callback_url:
                        _log.info("queueing the webhook of job {job_id}, which its node did not",
                                  job_id=job.id)  # fmt: skip
                        added = self._add(job, job.callback_url)
                        if added is not None:
                            await added
            self._polls += 1
            room = _IN_FLIGHT - len(self._deliveries)
            if room <= 0:
                return
            hold = self._timeout + _CLAIM_MARGIN
            now, spent = await self._queue.claim(self._node, hold, room, self._max_attempts)
        except Exception:
            _log.failure("could not look for webhooks to deliver")
            return
        for claimed in spent:
            _log.error("giving up on the webhook of job {job_id} to {url}: its {attempts}"
                       " attempts were made (a node stopped during the last)",
                       job_id=claimed.job_id, url=_for_log(claimed.url),
                       attempts=claimed.attempts)  # fmt: skip
        if self._unsubscribe is None:
            return
        for claimed in now:
            self._deliver(claimed)

    def _deliver(self, claimed: Claimed) -> None:
        # attempts - 1: _attempt counts the one it makes, as the claim did.
        delivery = _Delivery(claimed.job_id, claimed.url, claimed.body.encode("utf-8"),
                             claimed.delivery_id, claimed.attempts - 1)  # fmt: skip
        self._deliveries.add(delivery)
        self._attempt(delivery)

    def _check_held(self, held: bool, delivery: _Delivery) -> None:
        if not held:
            _log.warn("the claim on the webhook of job {job_id} lapsed before its attempt"
                      " {attempt} ended: another node may repeat it",
                      job_id=delivery.job_id, attempt=delivery.attempts)  # fmt: skip

    def _failed_write(self, f: Any) -> None:
        # The claim lapses, and the delivery is attempted again from the table.
        _log.failure("could not record a webhook's attempt", f)

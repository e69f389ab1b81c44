"""
A PostgreSQL LISTEN on a thread and a connection of its own, shared by the
cluster's job feed (L{transcoder.core.pgcluster}) and the upload locks'
requests to let go (L{transcoder.core.pguploadlocks}).

psycopg's notifications are read by blocking on the connection, so the loop
runs on its own thread and hands every payload to the reactor; it reconnects
after a lost connection, logging the loss once and the recovery once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from transcoder.core.postgres import oneline

# How long the thread waits for a notification before looking at its stop flag.
LISTEN_POLL = 0.5
# Pause before the thread reconnects after losing its connection.
RELISTEN_PAUSE = 1.0


class Listener:
    """
    LISTEN on C{channel}: each notification's payload goes to
    C{on_payload(payload)} on the reactor thread, and C{on_connect()} after
    every (re)connection, when notifications may have been missed.  Nothing
    is delivered once L{stop} was called.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        reactor: Any,
        channel: str,
        on_payload: Callable[[str], None],
        *,
        name: str,
        log: Logger,
        lost: str,
        regained: str,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._timeout = max(1, round(timeout))
        self._reactor = reactor
        self._channel = channel
        self._on_payload = on_payload
        self._on_connect = on_connect
        self._log = log
        # Log formats: C{lost} with an C{{error}} field.
        self._lost = lost
        self._regained = regained
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stopping.is_set():
            self._thread.start()

    def stop(self) -> Deferred[None]:
        """Fires once the thread has closed its connection (or after a bound)."""
        self._stopping.set()
        done: Deferred[None] = Deferred()
        # Watched from the reactor, never joined on it: a join would hold the
        # reactor for up to a poll, long enough to miss a lease renewal.
        deadline = self._reactor.seconds() + LISTEN_POLL * 4

        def check() -> None:
            if not self._thread.is_alive() or self._reactor.seconds() >= deadline:
                done.callback(None)
            else:
                self._reactor.callLater(0.05, check)

        check()
        return done

    def _deliver(self, payload: str) -> None:
        # A notification read just before stop() must not reach an owner that closed.
        if not self._stopping.is_set():
            self._on_payload(payload)

    def _connected(self) -> None:
        if not self._stopping.is_set() and self._on_connect is not None:
            self._on_connect()

    def _run(self) -> None:
        import psycopg

        failing = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._url, autocommit=True, connect_timeout=self._timeout
                ) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    if failing:
                        self._log.info(self._regained)
                    failing = False
                    self._reactor.callFromThread(self._connected)
                    while not self._stopping.is_set():
                        for n in conn.notifies(timeout=LISTEN_POLL):
                            self._reactor.callFromThread(self._deliver, n.payload)
            except psycopg.Error as e:
                if not failing:
                    self._log.warn(self._lost, error=oneline(e))
                failing = True
                self._stopping.wait(RELISTEN_PAUSE)

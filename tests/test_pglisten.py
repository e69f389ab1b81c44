"""
The shared LISTEN thread (L{transcoder.core.pglisten.Listener}) against a
real PostgreSQL: payloads reach the reactor, and none once stopped.
"""

from __future__ import annotations

import threading

import psycopg
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from transcoder.core.pglisten import Listener


def _notify(dsn: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify('pglisten_test', %s)", (payload,))


@pytest_twisted.ensureDeferred
async def test_payloads_reach_the_reactor_and_none_after_stop(pg_dsn: str) -> None:
    """on_connect and each payload are called on the reactor thread; stop() fires once the thread has ended, without joining it, and a notification sent after stop is never delivered."""
    heard: list[tuple[str, bool]] = []
    connected: Deferred[None] = Deferred()
    got: Deferred[None] = Deferred()
    main = threading.current_thread()

    def on_payload(payload: str) -> None:
        heard.append((payload, threading.current_thread() is main))
        if not got.called:
            got.callback(None)

    listener = Listener(
        pg_dsn,
        5,
        reactor,
        "pglisten_test",
        on_payload,
        name="test LISTEN",
        log=Logger(),
        lost="lost ({error})",
        regained="back",
        on_connect=lambda: connected.callback(None),
    )
    listener.start()
    await connected
    await threads.deferToThread(_notify, pg_dsn, "one")
    await got
    assert heard == [("one", True)]
    await listener.stop()
    assert not listener._thread.is_alive()
    await threads.deferToThread(_notify, pg_dsn, "two")
    assert heard == [("one", True)]

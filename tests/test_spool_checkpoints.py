"""The spool's checkpoints (a tus PATCH's bytes made durable as they come) when a write fails."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from transcoder.http.spool import Checkpoints, Spool
from transcoder.http.writer import ALIGN, FileWriter


async def _settle(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Let the reactor run callFromThread calls until predicate() holds."""
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d


async def _round_trip(spool: Spool) -> None:
    """Wait until the spool's thread has gone once more round its loop (hashes() is answered there)."""
    got: list[object] = []
    asking = threading.Thread(target=lambda: got.append(spool.hashes(lambda: False)))
    asking.start()
    await _settle(lambda: bool(got))
    asking.join()
    assert got


@pytest_twisted.ensureDeferred
async def test_a_failed_writer_stops_the_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a writer thread failed (reported once), a checkpoint that finds it so is the last: the spool's thread does not sync again and again while it waits for the next item (it spun on the CPU until the request was aborted)."""
    syncs: list[int | None] = []
    sync = FileWriter.sync

    def counted(self: FileWriter) -> int | None:
        result = sync(self)
        syncs.append(result)
        return result

    monkeypatch.setattr(FileWriter, "sync", counted)

    def broken(fd: int, view: memoryview, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    errors: list[OSError] = []
    spool = Spool(reactor, on_pressure=lambda paused: None, on_error=errors.append, pwrite=broken)
    spool.open(tmp_path / "input", checkpoints=Checkpoints(0.0, 1 << 30, lambda size: None))
    given: list[bool] = []
    spool.lend(memoryview(bytearray(ALIGN)), lambda: given.append(True))
    await _settle(lambda: bool(errors) and bool(syncs))
    await _round_trip(spool)
    await _round_trip(spool)
    try:
        assert [e.errno for e in errors] == [errno.EIO] and given == [True]
        assert syncs == [None]
    finally:
        spool.abort()

"""
Writing a request body's files on threads beside the reactor.

The reactor thread only parses HTTP and hands chunks over (or a
L{transcoder.http.pump.SocketPump} lends whole buffers, from its own thread);
hashing (SHA-256 alone costs about 0.55 CPU s/GiB here) happens on the spool's
thread (or on a pump's, see L{Spool.hashes}), and writing on two writer
threads (see L{transcoder.http.writer}), all of which release the GIL, so an upload
can use both cores.  The backlog between the reactor and the spool is
bounded: above C{high_water} bytes the reactor is told to stop reading from
the socket, and told to resume once the thread has caught up, so a slow disk
slows the client instead of growing memory.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

from transcoder.http.writer import STAGING_BUFFERS, FileWriter, Lent, PWrite

Opener = Callable[[Path], IO[bytes]]


def _open(path: Path) -> IO[bytes]:
    # Unbuffered: chunks are already large, and a buffer would copy them again.
    return open(path, "xb", buffering=0)


@dataclass
class SpooledFile:
    path: Path
    size: int
    sha256: str
    md5: str | None


class Checkpoints:
    """
    When an open file's bytes are made durable while it is written: after
    C{seconds} or C{nbytes} more bytes since the last time, whichever comes
    first (and only if bytes came).  C{synced(size)} is called on the
    reactor thread each time, with the bytes now durable.
    """

    __slots__ = ("_last_size", "_last_time", "nbytes", "seconds", "synced")

    def __init__(self, seconds: float, nbytes: int, synced: Callable[[int], None]) -> None:
        self.seconds = seconds
        self.nbytes = nbytes
        self.synced = synced
        self._last_size = -1
        self._last_time = 0.0

    def begin(self, size: int) -> None:
        self._last_size = size
        self._last_time = time.monotonic()

    def due(self, size: int) -> bool:
        if size <= self._last_size:
            return False
        late = time.monotonic() - self._last_time >= self.seconds
        return late or size - self._last_size >= self.nbytes

    def wait(self, size: int) -> float | None:
        """How long the spool's thread may wait for more bytes before it is due."""
        if size <= self._last_size:
            return None
        return max(0.0, self._last_time + self.seconds - time.monotonic())


class _Open:
    __slots__ = ("checkpoints", "extra", "keep", "md5", "path", "sha", "size", "start")

    def __init__(
        self,
        path: Path,
        md5: bool,
        size: int | None,
        start: int = 0,
        sha: Any = None,
        extra: tuple[Any, ...] = (),
        keep: bool = False,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.path = path
        self.md5 = md5
        self.size = size
        self.start = start
        self.sha = sha
        self.extra = extra
        self.keep = keep


_CLOSE = object()
_FINISH = object()
_ABORT = object()


class _Hashes:
    __slots__ = ("event", "objects")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.objects: list[Any] | None = None


class Spool:
    """
    Writes one or more files, one after another, from chunks handed over by the
    reactor thread.

    Call L{open}, L{write} any number of times, L{close_file}; repeat for more
    files; then L{finish}, or L{abort} at any time.  A write error (ENOSPC, EIO)
    is reported once through C{on_error} on the reactor thread, and every file
    written so far is removed.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        on_pressure: Callable[[bool], None],
        on_error: Callable[[OSError], None],
        opener: Opener = _open,
        high_water: int = 4 << 20,
        pwrite: PWrite = os.pwrite,
        staging_buffers: int = STAGING_BUFFERS,
    ) -> None:
        self._reactor = reactor
        self._staging_buffers = staging_buffers
        self._pwrite = pwrite
        self._error_reported = False
        self._on_pressure = on_pressure
        self._on_error = on_error
        self._opener = opener
        self._high = high_water
        self._low = high_water // 2
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Signalled as the backlog drains, for writers on other threads that wait.
        self._room = threading.Condition(self._lock)
        self._pending = 0
        self._paused = False
        self._done: Deferred[list[SpooledFile]] | None = None
        self._ended = False
        self._cleanup: Callable[[], None] | None = None
        # Files this spool created (only those are removed on abort).
        self._created: list[Path] = []
        self._thread = threading.Thread(target=self._run, name="transcoder-spool", daemon=True)
        self._thread.start()

    # Reactor-thread side.

    def open(
        self,
        path: Path,
        md5: bool = False,
        size: int | None = None,
        *,
        start: int = 0,
        sha: Any = None,
        extra: tuple[Any, ...] = (),
        keep: bool = False,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        """
        Start a new file.  Given its C{size}, the space is allocated ahead of
        the bytes, L{transcoder.http.writer.ALLOCATION_STEP} at a time (never all of it at once: the
        size is only what the client declares): a full disk fails before the
        bytes of that step are sent to it, and the direct writes are not
        extending ones, which cost half the CPU (0.03 against 0.06 s/GiB).

        A resumable upload's PATCH appends to a file that exists: from
        C{start} (then C{size} is where the file will end), continuing the
        SHA-256 object C{sha}, also feeding the C{extra} hash objects (the
        chunk's own checksum); with C{keep}, the file is not removed on
        L{abort}, since what came before this request is not the spool's.
        With C{checkpoints}, its bytes are made durable from time to time
        as they come (see L{Checkpoints}).
        """
        self._queue.put(_Open(path, md5, size, start, sha, extra, keep, checkpoints))

    def write(self, data: bytes, wait: bool = False) -> None:
        """
        Write C{data} to the open file.  On the reactor thread, a backlog above
        C{high_water} calls C{on_pressure(True)}; another thread (a pump's)
        passes C{wait} and is held here while the backlog is above it.
        """
        n = len(data)
        with self._lock:
            if wait:
                while self._pending > self._high and not self._ended:
                    self._room.wait(0.25)
                self._pending += n
                self._queue.put(data)
                return
            self._pending += n
            pause = self._pending > self._high and not self._paused
            if pause:
                self._paused = True
        self._queue.put(data)
        if pause:
            self._on_pressure(True)

    def lend(self, view: memoryview, give_back: Callable[[], None], hashed: bool = False) -> None:
        """
        Write a buffer that stays its owner's: C{give_back} is called once it
        is hashed and written (or dropped, after a failure), on the spool's
        thread or a writer's, whichever finishes with it last.  With
        C{hashed}, the lender has hashed it already (see L{hashes}).
        Callable from any thread; the owner bounds how much it lends, so
        this does not count towards the pressure that pauses the reactor.
        """
        self._queue.put(Lent(view, give_back, hashed))

    def hashes(self, stop: Callable[[], bool]) -> list[Any] | None:
        """
        The open file's hash objects, once every byte written or lent before
        has gone into them, for a lender on another thread to feed the bytes
        it lends from then on (passing C{hashed}), until it stops lending.
        Blocks until the spool's thread gets there; None if there is no open
        file, or C{stop()} turns true meanwhile.
        """
        ready = _Hashes()
        self._queue.put(ready)
        while not ready.event.wait(0.25):
            if stop() or self._ended:
                return None
        return ready.objects

    def close_file(self) -> None:
        self._queue.put(_CLOSE)

    def finish(self) -> Deferred[list[SpooledFile]]:
        """Fires with every file once all of it is on disk; errbacks with the write error."""
        self._done = Deferred()
        self._queue.put(_FINISH)
        return self._done

    @property
    def ended(self) -> bool:
        """True once L{finish} fired or L{abort} was called."""
        return self._ended

    def abort(self, cleanup: Callable[[], None] | None = None) -> None:
        """
        Stop writing and remove every file, then run C{cleanup} on the spool's
        thread (once nothing holds the files any more).  Safe to call more
        than once.  Once L{finish} has fired the files belong to the caller:
        this only runs C{cleanup}, at once.
        """
        if self._ended:
            if cleanup is not None:
                cleanup()
            return
        self._ended = True
        self._cleanup = cleanup
        self._queue.put(_ABORT)

    # Spool-thread side.

    def _run(self) -> None:
        current: FileWriter | None = None
        checkpoints: Checkpoints | None = None
        files: list[SpooledFile] = []
        failed = False

        def report(e: OSError) -> None:
            self._reactor.callFromThread(self._failed, e)

        while True:
            if checkpoints is not None and current is not None and not failed:
                if checkpoints.due(current.size):
                    try:
                        synced = current.sync()
                    except OSError as e:
                        failed = True
                        report(e)
                        continue
                    if synced is None:
                        # A writer failed and reported it: as for a write, nothing
                        # more is done (else this loop would sync again at once, on and on).
                        failed = True
                        continue
                    checkpoints.begin(synced)
                    self._reactor.callFromThread(checkpoints.synced, synced)
                wait = checkpoints.wait(current.size)
            else:
                wait = None
            try:
                # A slow client's staged bytes are made durable in time too.
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if item is _ABORT:
                break
            if isinstance(item, Lent | bytes | bytearray | memoryview):
                lent = item if isinstance(item, Lent) else None
                data = item.view if isinstance(item, Lent) else item
                if current is not None and current.failed:
                    failed = True
                if not failed and current is not None:
                    try:
                        current.write(data, lent)
                    except OSError as e:
                        failed = True
                        report(e)
                if lent is not None:
                    lent.release()
                else:
                    self._drained(len(data))
            elif isinstance(item, _Open):
                try:
                    f = self._opener(item.path)
                    if not item.keep:
                        self._created.append(item.path)
                    current = FileWriter(
                        item.path,
                        f,
                        item.md5,
                        report,
                        self._pwrite,
                        self._staging_buffers,
                        declared=item.size or None,
                        start=item.start,
                        sha=item.sha,
                        extra=item.extra,
                    )
                    checkpoints = item.checkpoints
                    if checkpoints is not None:
                        checkpoints.begin(item.start)
                except OSError as e:
                    failed = True
                    report(e)
            elif isinstance(item, _Hashes):
                if current is not None and not failed:
                    item.objects = [current.sha] + ([current.md5] if current.md5 else [])
                    item.objects += current.extra
                item.event.set()
            elif item is _CLOSE:
                checkpoints = None
                if current is not None:
                    done, current = current, None
                    try:
                        if done.close() is not None:
                            failed = True  # the writer reported it
                    except OSError as e:
                        if not failed:
                            failed = True
                            report(e)
                    files.append(
                        SpooledFile(
                            done.path,
                            done.size,
                            done.sha.hexdigest(),
                            done.md5.hexdigest() if done.md5 is not None else None,
                        )
                    )
            elif item is _FINISH:
                if not failed:
                    # Done: the files are kept, and nothing more comes.
                    self._reactor.callFromThread(self._finished, files)
                    return
                # A failed spool waits for abort() to clean up.
        if current is not None:
            current.abandon()
        for p in self._created:
            try:
                os.unlink(p)
            except OSError:
                pass
        if self._cleanup is not None:
            self._cleanup()

    def _drained(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            resume = self._paused and self._pending <= self._low
            if resume:
                self._paused = False
            if self._pending <= self._high:
                self._room.notify_all()
        if resume:
            self._reactor.callFromThread(self._on_pressure, False)

    # Back on the reactor thread.

    def _finished(self, files: list[SpooledFile]) -> None:
        self._ended = True
        if self._done is not None:
            self._done.callback(files)

    def _failed(self, error: OSError) -> None:
        if self._error_reported:
            return
        self._error_reported = True
        self._on_error(error)
        if self._done is not None and not self._done.called:
            self._done.errback(error)

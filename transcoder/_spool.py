"""
Writing a request body's files on a thread beside the reactor.

The reactor thread only parses HTTP and hands chunks over; writing and hashing
(SHA-256 alone costs about 0.55 CPU s/GiB here) happen on the spool's own
thread, where both release the GIL, so an upload can use both cores.  The
backlog between the two is bounded: above C{highWater} bytes the reactor is
told to stop reading from the socket, and told to resume once the thread has
caught up, so a slow disk slows the client instead of growing memory.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

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


# Start writing a file's dirty pages out every this many bytes, instead of
# letting a big upload pile up gigabytes of them for the kernel to throttle
# (an upload that followed others ran 3x slower, in system time, without it).
WRITEBACK_EVERY = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
    _sync_file_range: Any = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):
    _sync_file_range = None


def _write_all(f: IO[bytes], data: bytes | bytearray | memoryview) -> None:
    # A raw file's write() may write less than asked (a full disk, a signal).
    view = memoryview(data)
    while view:
        written = f.write(view)
        if written is None or written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _start_writeback(f: IO[bytes], flushed: int, size: int) -> int:
    """Ask the kernel to start writing out what was written since C{flushed}; the new mark."""
    if _sync_file_range is None or size - flushed < WRITEBACK_EVERY:
        return flushed
    try:
        fd = f.fileno()
    except (OSError, AttributeError, ValueError):
        return size
    # Non-blocking: it only starts the writeback of that range.
    _sync_file_range(fd, flushed, size - flushed, _SYNC_FILE_RANGE_WRITE)
    return size


class _Open:
    __slots__ = ("md5", "path")

    def __init__(self, path: Path, md5: bool) -> None:
        self.path = path
        self.md5 = md5


_CLOSE = object()
_FINISH = object()
_ABORT = object()


class Spool:
    """
    Writes one or more files, one after another, from chunks handed over by the
    reactor thread.

    Call L{open}, L{write} any number of times, L{closeFile}; repeat for more
    files; then L{finish}, or L{abort} at any time.  A write error (ENOSPC, EIO)
    is reported once through C{onError} on the reactor thread, and every file
    written so far is removed.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        onPressure: Callable[[bool], None],
        onError: Callable[[OSError], None],
        opener: Opener = _open,
        highWater: int = 8 << 20,
    ) -> None:
        self._reactor = reactor
        self._onPressure = onPressure
        self._onError = onError
        self._opener = opener
        self._high = highWater
        self._low = highWater // 2
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
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

    def open(self, path: Path, md5: bool = False) -> None:
        self._queue.put(_Open(path, md5))

    def write(self, data: bytes) -> None:
        n = len(data)
        with self._lock:
            self._pending += n
            pause = self._pending > self._high and not self._paused
            if pause:
                self._paused = True
        self._queue.put(data)
        if pause:
            self._onPressure(True)

    def closeFile(self) -> None:
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
        f: IO[bytes] | None = None
        sha: Any = None
        md5: Any = None
        size = 0
        flushed = 0
        current: Path | None = None
        files: list[SpooledFile] = []
        failed = False
        while True:
            item = self._queue.get()
            if item is _ABORT:
                break
            if isinstance(item, bytes | bytearray | memoryview):
                n = len(item)
                if not failed and f is not None:
                    try:
                        _write_all(f, item)
                        flushed = _start_writeback(f, flushed, size + n)
                        size += n
                        sha.update(item)
                        if md5 is not None:
                            md5.update(item)
                    except OSError as e:
                        failed = True
                        self._reactor.callFromThread(self._failed, e)
                self._drained(n)
            elif isinstance(item, _Open):
                current = item.path
                size = 0
                flushed = 0
                sha = hashlib.sha256()
                md5 = hashlib.md5() if item.md5 else None
                try:
                    f = self._opener(item.path)
                    self._created.append(item.path)
                except OSError as e:
                    failed = True
                    self._reactor.callFromThread(self._failed, e)
            elif item is _CLOSE:
                if f is not None:
                    try:
                        f.close()
                    except OSError as e:
                        if not failed:
                            failed = True
                            self._reactor.callFromThread(self._failed, e)
                    f = None
                    if current is not None and sha is not None:
                        files.append(
                            SpooledFile(
                                current, size, sha.hexdigest(), md5.hexdigest() if md5 else None
                            )
                        )
            elif item is _FINISH:
                if not failed:
                    # Done: the files are kept, and nothing more comes.
                    self._reactor.callFromThread(self._finished, files)
                    return
                # A failed spool waits for abort() to clean up.
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
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
        if resume:
            self._reactor.callFromThread(self._onPressure, False)

    # Back on the reactor thread.

    def _finished(self, files: list[SpooledFile]) -> None:
        self._ended = True
        if self._done is not None:
            self._done.callback(files)

    def _failed(self, error: OSError) -> None:
        self._onError(error)
        if self._done is not None and not self._done.called:
            self._done.errback(error)

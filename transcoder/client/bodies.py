"""
Request bodies streamed from disk for L{transcoder.client.api}: a raw file, or
C{multipart/form-data} written part by part, each counted and hashed as it
is sent.

treq's own C{MultiPartProducer} streams too, but it runs on the global
cooperator and tells nothing about progress; this one reports every chunk
and computes each file's SHA-256 on the way, so the client can compare it
with the digest the server stored without reading the file a second time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import termios
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import (
    Cooperator,
    NotPaused,
    SchedulerStopped,
    TaskFinished,
    TaskStopped,
)
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

# Bytes read and written per step.  Each step runs to completion in the
# reactor thread, so this bounds the memory one upload holds at once.
CHUNK_SIZE = 256 * 1024

ProgressCallback = Callable[[int, int], None]


@dataclass
class FilePart:
    """A file sent as (part of) a body; C{sha256} is filled in once it is sent."""

    path: Path
    size: int
    sha256: str | None = None


def _quote(value: str) -> bytes:
    # What browsers do with form field names and filenames (WHATWG HTML):
    # UTF-8, with the three characters that would end the header escaped.
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode("utf-8")


@implementer(IBodyProducer)
class StreamingBody:
    """
    An L{IBodyProducer} of a fixed sequence of segments: literal bytes and
    files, whose sizes are taken when it is built (so C{length} is known and
    the request gets a C{Content-Length}).  A file that changes size before
    it is sent fails the upload rather than sending something else.
    """

    def __init__(
        self,
        segments: Sequence[bytes | FilePart],
        cooperator: Cooperator,
        on_progress: ProgressCallback | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self._segments = list(segments)
        self._cooperator = cooperator
        self._on_progress = on_progress
        self._chunk = chunk_size
        self.length = sum(s.size if isinstance(s, FilePart) else len(s) for s in self._segments)
        self.sent = 0
        self._task: Any = None
        self._consumer: Any = None

    @classmethod
    def raw(
        cls,
        path: Path,
        cooperator: Cooperator,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[StreamingBody, FilePart]:
        part = FilePart(path, os.stat(path).st_size)
        return cls([part], cooperator, on_progress), part

    @classmethod
    def multipart(
        cls,
        files: Mapping[str, Path],
        cooperator: Cooperator,
        on_progress: ProgressCallback | None = None,
        boundary: str | None = None,
    ) -> tuple[StreamingBody, bytes, dict[str, FilePart]]:
        """
        A C{multipart/form-data} body with one file part per entry of
        C{files} (field name: path).  Returns the body, its content type and
        the parts by field name.
        """
        marker = (boundary or uuid.uuid4().hex).encode("ascii")
        segments: list[bytes | FilePart] = []
        parts: dict[str, FilePart] = {}
        for name, path in files.items():
            part = FilePart(Path(path), os.stat(path).st_size)
            parts[name] = part
            segments.append(
                b'--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n"
                % (marker, _quote(name), _quote(Path(path).name))
            )
            segments.append(part)
            segments.append(b"\r\n")
        segments.append(b"--%s--\r\n" % marker)
        return (
            cls(segments, cooperator, on_progress),
            b"multipart/form-data; boundary=" + marker,
            parts,
        )

    def unsent(self) -> int | None:
        """
        Bytes written to the connection that its peer has not yet taken
        (the kernel's send queue, SIOCOUTQ); None where that cannot be read
        (not started, not a plain TCP socket).  Once the whole body is
        written, megabytes may still be on their way on a slow link.
        """
        # twisted.web's client hands a wrapper of the transport (_newclient's
        # LengthEnforcingConsumer): the transport is its _consumer.
        transport = getattr(self._consumer, "_consumer", self._consumer)
        handle = getattr(transport, "getHandle", None)
        if handle is None:
            return None
        try:
            queued = fcntl.ioctl(handle().fileno(), termios.TIOCOUTQ, b"\0" * 4)
        except (OSError, AttributeError, TypeError, ValueError):
            return None
        return int.from_bytes(queued, sys.byteorder, signed=True)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._task = self._cooperator.cooperate(self._produce(consumer))
        d: Deferred[Any] = self._task.whenDone()

        def done(_: object) -> None:
            return None

        def stopped(f: Failure) -> Deferred[None] | Failure:
            if f.check(TaskStopped, SchedulerStopped):
                # stopProducing, or the client closed: the request is over, and
                # the caller learns why from the request itself.
                return Deferred()
            return f

        return d.addCallbacks(done, stopped)

    def _produce(self, consumer: IConsumer) -> Iterator[None]:
        for segment in self._segments:
            if not isinstance(segment, FilePart):
                self._sent(consumer, segment)
                yield None
                continue
            digest = hashlib.sha256()
            left = segment.size
            with segment.path.open("rb") as f:
                while left > 0:
                    data = f.read(min(self._chunk, left))
                    if not data:
                        raise OSError(f"{segment.path} shrank while it was being sent")
                    left -= len(data)
                    digest.update(data)
                    self._sent(consumer, data)
                    yield None
                if f.read(1):
                    raise OSError(f"{segment.path} grew while it was being sent")
            segment.sha256 = digest.hexdigest()

    def _sent(self, consumer: IConsumer, data: bytes) -> None:
        consumer.write(data)
        self.sent += len(data)
        if self._on_progress is not None:
            self._on_progress(self.sent, self.length)

    def pauseProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.pause()
            except TaskFinished:
                pass

    def resumeProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.resume()
            except (TaskFinished, NotPaused):
                pass

    def stopProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.stop()
            except TaskFinished:
                pass

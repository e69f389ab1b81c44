"""
The encoder as a process: spawned in a process group of its own (through
C{setsid}) and bound to die with the node (L{transcoder.engine.deathsig}),
its two pipes drained into its log, the tail of what it printed and the
progress parser, and its group signalled to stop it.
"""

from __future__ import annotations

import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.engine.deathsig import tied_to_node
from transcoder.engine.progress import FfmpegProgress, MencoderProgress

LOG_NAME = "encoder.log"
LOG_LIMIT = 16 * 1024 * 1024
TAIL_LINES = 20
_MAX_TAIL_LINE = 300
_NO_SPACE = b"No space left on device"

_log = Logger()

KillGroup = Callable[[int, int], None]


class Tail:
    """
    The last lines of an encoder's output, as a terminal would have shown them:
    a carriage return starts the line over, so mencoder's status line, redrawn
    thousands of times, leaves one line and not thousands.
    """

    def __init__(self, size: int) -> None:
        self.lines: deque[str] = deque(maxlen=size)
        self._partial: dict[int, bytes] = {}
        self._last: dict[int, str] = {}
        # Whether a line said the disk was full: the encoder saw ENOSPC.
        self.no_space = False

    def feed(self, fd: int, data: bytes) -> None:
        pieces = (self._partial.get(fd, b"") + data).split(b"\n")
        for piece in pieces[:-1]:
            self._add(fd, piece)
        rest = pieces[-1]
        # Keep only the line being redrawn, and not all of an endless one.
        cut = rest.rfind(b"\r", 0, len(rest) - 1)
        self._partial[fd] = rest[cut + 1 :][-4 * _MAX_TAIL_LINE :]

    def flush(self) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._add(fd, rest)
        self._partial.clear()

    def _add(self, fd: int, raw: bytes) -> None:
        if _NO_SPACE in raw:
            self.no_space = True
        shown = raw.rstrip(b"\r").rsplit(b"\r", 1)[-1]
        text = shown.decode("utf-8", "replace").strip()[:_MAX_TAIL_LINE]
        self.lines.append(text)
        if text:
            self._last[fd] = text

    def text(self) -> str | None:
        return "\n".join(self.lines) or None

    def last_line(self) -> str | None:
        """The last words worth quoting: encoders complain on stderr."""
        return self._last.get(2) or self._last.get(1)


class EncoderProtocol(ProcessProtocol):
    """Drains both pipes into the log, the tail and the progress parser, as output comes."""

    def __init__(
        self,
        log: BinaryIO,
        log_limit: int,
        parser: MencoderProgress | FfmpegProgress | None,
        on_progress: Callable[[float], None],
        clock: IReactorTime,
    ) -> None:
        # The process has exited (and been reaped); its pipes may still hold output.
        self.exited: Deferred[BaseException] = Deferred()
        # ... and its pipes are drained and closed.
        self.ended: Deferred[BaseException] = Deferred()
        self.tail = Tail(TAIL_LINES)
        self._log: BinaryIO | None = log
        self._limit = log_limit
        self._written = 0
        self._parser = parser
        self._on_progress = on_progress
        self._clock = clock
        self._exited = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._write_log(data)
        self.tail.feed(childFD, data)
        # After the exit the job's progress no longer moves: what is left in
        # the pipes (on a short encode, all it printed) goes to the log and tail only.
        if childFD == 1 and self._parser is not None and not self._exited:
            value = self._parser.feed(data)
            if value is not None:
                self._on_progress(value)

    def processExited(self, reason: Failure) -> None:
        self._exited = True
        self.exited.callback(reason.value or ProcessTerminated())

    def _write_log(self, data: bytes) -> None:
        if self._log is None:
            return
        room = self._limit - self._written
        try:
            if len(data) <= room:
                self._log.write(data)
                self._written += len(data)
                return
            self._log.write(data[:room])
            self._log.write(
                b"\n[transcoder: log truncated at %d bytes; the rest of the output was discarded]\n"
                % self._limit
            )
        except OSError as e:
            _log.warn("cannot write the encoder log: {error}", error=e)
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            except OSError as e:
                _log.warn("cannot write the encoder log: {error}", error=e)
            self._log = None

    def processEnded(self, reason: Failure) -> None:
        if not self.exited.called:
            self.exited.callback(reason.value or ProcessTerminated())
        self.tail.flush()
        self.close_log()
        # The exception, not the Failure: a Failure would take the errback path.
        self.ended.callback(reason.value or ProcessTerminated())


def spawn_encoder(
    reactor: IReactorProcess,
    proto: EncoderProtocol,
    argv: list[str],
    job_dir: Path,
    env: dict[str, str],
) -> IProcessTransport:
    """
    Start C{argv} in a process group of its own, in C{job_dir}, its stdin
    closed and its output read by C{proto}, as C{setpriv --pdeathsig KILL
    setsid argv} so that it dies with this process.  Raises L{OSError} if it
    cannot be started.
    """
    setsid = shutil.which("setsid", path=env["PATH"]) or "/usr/bin/setsid"
    # setpriv execs setsid in place, and util-linux setsid execs the
    # encoder in place when its caller does not lead a process group (a
    # freshly spawned child never does), so the pid we get is the
    # encoder's and also its process group id.
    executable, args = tied_to_node(setsid, ["setsid", *argv], env["PATH"])
    transport = reactor.spawnProcess(
        proto,
        executable,
        args,
        env=env,
        path=str(job_dir),
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    transport.closeStdin()
    return transport


def signal_group(
    killpg: KillGroup, pid: int, transport: IProcessTransport | None, sig: int
) -> None:
    """Send C{sig} to the process group C{pid}, whose leader C{transport} started."""
    try:
        killpg(pid, sig)
    except ProcessLookupError:
        # No such group yet: a stop right after the spawn can come before
        # setsid has run in the child (still setpriv or setsid then).  The
        # transport signals the child itself, and knows (unlike a bare pid)
        # whether it was reaped.
        if transport is not None:
            try:
                transport.signalProcess(sig)
            except (ProcessExitedAlready, OSError):
                pass
    except OSError as e:
        _log.warn("cannot signal process group {pid}: {error}", pid=pid, error=e)


def exit_status(ended: BaseException) -> tuple[int | None, int | None]:
    """(exit code, signal) of an ended process; one of them is None."""
    if isinstance(ended, ProcessTerminated):
        return ended.exitCode, ended.signal
    if isinstance(ended, ProcessDone):
        return 0, None
    return None, None

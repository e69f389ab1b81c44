"""
The encoder as a process: spawned in a process group of its own (through
C{setsid}), its two pipes drained into its log, the tail of what it printed
and the progress parser, and its group signalled to stop it.
"""

from __future__ import annotations

import fcntl
import functools
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.engine.probe import tool_env
from transcoder.engine.progress import FfmpegProgress, MencoderProgress

LOG_NAME = "encoder.log"
LOG_LIMIT = 16 * 1024 * 1024
TAIL_LINES = 20
_MAX_TAIL_LINE = 300
# Seconds that reading an encoder's output rests after a read emptied a pipe,
# and the size its pipes are given so that they hold what it prints meanwhile:
# 10 MB/s of output, where mencoder's busiest (a stream copy) printed 4 MB/s.
READ_PAUSE = 0.1
PIPE_SIZE = 1024 * 1024
# What Twisted's process reader asks for at once: a read this long may have
# left more in the pipe.
_FULL_READ = 8192
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


class _Pausable(Protocol):
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class EncoderProtocol(ProcessProtocol):
    """
    Drains both pipes into the log, the tail and the progress parser.

    mencoder prints a status line for every frame: read as it comes, that is
    a thousand wake-ups of the server a second, each costing about 0.1 ms of
    CPU that the encoder, using every core, then lacks.  So, once L{rest}
    allowed it, a read that emptied a pipe makes reading rest for a while
    (both pipes: the transport pauses as a whole) while the pipes collect the
    next lines; a read that filled Twisted's buffer means more is waiting,
    and reading goes on.  The child's exit ends the rest at once, so the end
    of the output is read without delay.
    """

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
        self._read_pause = 0.0
        self._resting: IDelayedCall | None = None
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
        if len(data) < _FULL_READ:
            self._rest()

    def rest(self, seconds: float) -> None:
        """
        Rest C{seconds} after each read that emptied a pipe.  Only for pipes
        that hold what the encoder may print meanwhile: a full pipe would stop it.
        """
        self._read_pause = seconds

    def _rest(self) -> None:
        if self._read_pause <= 0 or self._exited or self._resting is not None:
            return
        cast(_Pausable, self.transport).pauseProducing()
        self._resting = self._clock.callLater(self._read_pause, self._wake)

    def _wake(self) -> None:
        self._resting = None
        cast(_Pausable, self.transport).resumeProducing()

    def processExited(self, reason: Failure) -> None:
        self._exited = True
        if self._resting is not None:
            self._resting.cancel()
            self._wake()
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


@functools.cache
def env_chdir() -> str | None:
    """
    The path of an C{env} that takes C{-C DIR} (GNU coreutils 8.28 and later),
    or C{None}.  Asked once, with a blocking run of a few milliseconds:
    L{transcoder.service.makeService} asks before the reactor starts.
    """
    env = shutil.which("env", path=tool_env()["PATH"])
    if env is None:
        return None
    try:
        done = subprocess.run(
            [env, "-C", "/", "true"],
            env=tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return env if done.returncode == 0 else None


def enlarge_pipes(transport: object) -> bool:
    """
    Make the encoder's stdout and stderr pipes hold L{PIPE_SIZE} bytes; whether
    that worked (Linux only, within the system's limits, and only with
    Twisted's own process transport, whose pipes are known).
    """
    pipes = getattr(transport, "pipes", None)
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if not isinstance(pipes, dict) or set_size is None:
        return False
    try:
        for child_fd in (1, 2):
            if fcntl.fcntl(pipes[child_fd].fileno(), set_size, PIPE_SIZE) < PIPE_SIZE:
                return False
    except (KeyError, AttributeError, OSError):
        return False
    return True


def spawn_encoder(
    reactor: IReactorProcess,
    proto: EncoderProtocol,
    argv: list[str],
    job_dir: Path,
    env: dict[str, str],
    read_pause: float,
) -> IProcessTransport:
    """
    Start C{argv} in a process group of its own, in C{job_dir}, its stdin
    closed and its output read by C{proto}, resting C{read_pause} seconds
    between reads where its pipes could be enlarged.  Raises L{OSError} if it
    cannot be started.
    """
    setsid = shutil.which("setsid", path=env["PATH"]) or "/usr/bin/setsid"
    # util-linux setsid execs the encoder in place when its caller does
    # not lead a process group (a freshly spawned child never does), so
    # the pid we get is the encoder's and also its process group id.
    executable, args = setsid, ["setsid", *argv]
    cwd: str | None = str(job_dir)
    chdir = env_chdir()
    if chdir is not None:
        # Given a working directory, Twisted forks, and the child runs
        # Python until its exec: 5 to 6 ms from fork to setsid's exec here.
        # Without one it uses posix_spawn, and GNU env sets the directory.
        executable, args = chdir, ["env", "-C", str(job_dir), setsid, *argv]
        cwd = None
    transport = reactor.spawnProcess(
        proto,
        executable,
        args,
        env=env,
        path=cwd,
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    transport.closeStdin()
    if read_pause > 0 and enlarge_pipes(transport):
        proto.rest(read_pause)
    return transport


def signal_group(
    killpg: KillGroup, pid: int, transport: IProcessTransport | None, sig: int
) -> None:
    """Send C{sig} to the process group C{pid}, whose leader C{transport} started."""
    try:
        killpg(pid, sig)
    except ProcessLookupError:
        # No such group yet: a stop right after the spawn can come before
        # setsid has run in the child.  The transport signals the child
        # itself, and knows (unlike a bare pid) whether it was reaped.
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

"""
Run one job's encode: probe the inputs, run the profile's encoder in a process
group of its own, watch it, and accept its output only after checking it.

An encoder's exit status alone proves little: mencoder exits 0 after "encoding"
garbage it took for raw DV, and leaves a valid but truncated AVI when stopped.
So an output counts only if ffprobe reads it and its duration matches the
input's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorProcess,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from transcoder._progress import FfmpegProgress, MencoderProgress
from transcoder.jobs import JobState, OutputFile
from transcoder.probe import MediaInfo, NotMediaError, tool_env
from transcoder.probe import probe as ffprobe
from transcoder.profiles import ParamValue, Profile

LOG_NAME = "encoder.log"
LOG_LIMIT = 16 * 1024 * 1024
TAIL_LINES = 20
# Progress stays below this until the output has been checked.
_BEFORE_DONE = 99.9
# Durations are checked relatively, but never tighter than a few frames, so a
# very short input is not failed over one frame of rounding.
_MIN_DURATION_SLACK = 0.1
_MAX_TAIL_LINE = 300
_HASH_CHUNK = 1024 * 1024

_log = Logger()
_T = TypeVar("_T")

ProbeFunction = Callable[[IReactorProcess, Path], Deferred[MediaInfo]]
HashFunction = Callable[[Path], Deferred[str]]
KillGroup = Callable[[int, int], None]


@dataclass
class Outcome:
    """How an execution ended; C{error} says why when C{state} is FAILED."""

    state: JobState
    output: OutputFile | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None


class IJobExecution(Interface):
    """One job's encode, under way."""

    deferred = Attribute("Deferred[Outcome]; never errbacks")
    pid = Attribute("int | None: process group id of the running encoder")

    def cancel() -> None:
        """TERM the encoder's process group, KILL after the grace; outcome CANCELLED."""


class _Stop:
    """Why an execution was told to stop."""

    CANCEL = "cancel"
    TIMEOUT = "timeout"


class _Tail:
    """
    The last lines of an encoder's output, as a terminal would have shown them:
    a carriage return starts the line over, so mencoder's status line, redrawn
    thousands of times, leaves one line and not thousands.
    """

    def __init__(self, size: int) -> None:
        self.lines: deque[str] = deque(maxlen=size)
        self._partial: dict[int, bytes] = {}
        self._last: dict[int, str] = {}

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


class _EncoderProtocol(ProcessProtocol):
    """Drains both pipes into the log, the tail and the progress parser."""

    def __init__(
        self,
        log: BinaryIO,
        log_limit: int,
        parser: MencoderProgress | FfmpegProgress | None,
        on_progress: Callable[[float], None],
    ) -> None:
        self.ended: Deferred[BaseException] = Deferred()
        self.tail = _Tail(TAIL_LINES)
        self._log: BinaryIO | None = log
        self._limit = log_limit
        self._written = 0
        self._parser = parser
        self._on_progress = on_progress

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._write_log(data)
        self.tail.feed(childFD, data)
        if childFD == 1 and self._parser is not None:
            value = self._parser.feed(data)
            if value is not None:
                self._on_progress(value)

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
        self.tail.flush()
        self.close_log()
        # The exception, not the Failure: a Failure would take the errback path.
        self.ended.callback(reason.value or ProcessTerminated())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _exit_status(ended: BaseException) -> tuple[int | None, int | None]:
    """(exit code, signal) of an ended process; one of them is None."""
    if isinstance(ended, ProcessTerminated):
        return ended.exitCode, ended.signal
    if isinstance(ended, ProcessDone):
        return 0, None
    return None, None


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _with_detail(message: str, detail: str | None) -> str:
    return f"{message}: {detail}" if detail else message


@implementer(IJobExecution)
class _Execution:
    def __init__(
        self,
        reactor: IReactorProcess,
        job_dir: Path,
        profile: Profile,
        inputs: Mapping[str, Path],
        params: Mapping[str, ParamValue],
        timeout: float | None,
        on_progress: Callable[[float], None],
        on_spawn: Callable[[int], None],
        kill_grace: float,
        probe: ProbeFunction,
        hash_file: HashFunction | None,
        killpg: KillGroup,
        log_limit: int,
    ) -> None:
        self.deferred: Deferred[Outcome] = Deferred()
        self.pid: int | None = None
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._job_dir = job_dir
        self._profile = profile
        self._inputs = dict(inputs)
        self._params = dict(params)
        self._timeout = timeout
        self._on_progress = on_progress
        self._on_spawn = on_spawn
        self._kill_grace = kill_grace
        self._probe = probe
        self._hash_file = hash_file
        self._killpg = killpg
        self._log_limit = log_limit
        self._partial = job_dir / f"result.partial.{profile.output_extension}"
        self._stop: str | None = None
        self._finished = False
        self._progress = 0.0
        self._waiting: Deferred[object] | None = None
        self._time_limit: IDelayedCall | None = None
        self._kill_timer: IDelayedCall | None = None
        self._tail: _Tail | None = None

    # Public

    def cancel(self) -> None:
        self._request_stop(_Stop.CANCEL)

    # Flow

    def start(self) -> None:
        if self._timeout is not None:
            self._time_limit = self._clock.callLater(self._timeout, self._timed_out)
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(self._internal_error)
        d.addCallback(self._finish)

    async def _run(self) -> Outcome:
        self._partial.unlink(missing_ok=True)
        for role in self._profile.inputs:
            if role not in self._inputs:
                return self._failed(f"missing input: {role}")
        # All inputs are probed at once: each ffprobe costs tens of milliseconds.
        probes = [
            (role, maybeDeferred(self._probe, self._reactor, self._inputs[role]))
            for role in self._profile.inputs
        ]
        infos: list[MediaInfo] = []
        try:
            for role, probing in probes:
                try:
                    infos.append(await self._interruptible(probing))
                except CancelledError:
                    return self._stopped(None)
                except NotMediaError:
                    return self._failed(f"not a recognised media file: {role}")
                except Exception as e:
                    _log.failure("probing input {role}", Failure(), role=role)
                    return self._failed(f"could not probe input {role}: {e}")
        finally:
            for _, probing in probes:
                if not probing.called:
                    probing.cancel()
                probing.addErrback(lambda _: None)
        if self._stop is not None:
            return self._stopped(None)

        ended = self._spawn(infos[0].duration)
        if isinstance(ended, Outcome):
            return ended
        status = await ended
        self.pid = None
        self._cancel_timers()
        exit_code, sig = _exit_status(status)
        if self._stop is not None:
            return self._stopped(exit_code)
        last = self._tail.last_line() if self._tail is not None else None
        if sig is not None:
            return self._failed(_with_detail(f"encoder killed by signal {sig}", last), exit_code)
        if exit_code != 0:
            return self._failed(
                _with_detail(f"encoder exited with code {exit_code}", last), exit_code
            )
        return await self._accept(infos[0].duration, last)

    def _spawn(self, duration: float | None) -> Deferred[BaseException] | Outcome:
        try:
            argv = self._profile.build_argv(
                {role: str(path) for role, path in self._inputs.items()},
                output=str(self._partial),
                params=self._params,
            )
        except KeyError as e:
            return self._failed(f"missing parameter: {e.args[0]}")
        env = tool_env(home=self._job_dir)
        if shutil.which(argv[0], path=env["PATH"]) is None:
            return self._failed(f"encoder not found: {argv[0]}")
        setsid = shutil.which("setsid", path=env["PATH"]) or "/usr/bin/setsid"
        parser: MencoderProgress | FfmpegProgress | None = None
        if self._profile.progress == "mencoder":
            parser = MencoderProgress(duration)
        elif self._profile.progress == "ffmpeg":
            parser = FfmpegProgress(duration)
        try:
            # Unbuffered: the log can be read while the encoder runs.
            log = (self._job_dir / LOG_NAME).open("wb", buffering=0)
        except OSError as e:
            return self._failed(f"cannot write the encoder log: {e}")
        proto = _EncoderProtocol(log, self._log_limit, parser, self._report_progress)
        self._tail = proto.tail
        try:
            # util-linux setsid execs the encoder in place when its caller does
            # not lead a process group (a freshly spawned child never does), so
            # the pid we get is the encoder's and also its process group id.
            transport = self._reactor.spawnProcess(
                proto,
                setsid,
                ["setsid", *argv],
                env=env,
                path=str(self._job_dir),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            proto.close_log()
            return self._failed(f"cannot start the encoder: {e}")
        transport.closeStdin()
        self.pid = transport.pid
        if self.pid is not None:
            try:
                self._on_spawn(self.pid)
            except Exception:
                _log.failure("on_spawn raised")
        if self._stop is not None:
            self._terminate()
        return proto.ended

    async def _accept(self, duration: float | None, last: str | None) -> Outcome:
        """Check the encoder's output and, if it passes, make it the result."""
        # Hashing (on a thread) runs while ffprobe checks the output: if the
        # output fails the check, the digest is simply not used.
        hashing = self._hash(self._partial)
        try:
            return await self._check_and_keep(duration, last, hashing)
        finally:
            if not hashing.called:
                hashing.cancel()
            hashing.addErrback(lambda _: None)

    async def _check_and_keep(
        self, duration: float | None, last: str | None, hashing: Deferred[str]
    ) -> Outcome:
        try:
            info = await self._interruptible(
                maybeDeferred(self._probe, self._reactor, self._partial)
            )
        except CancelledError:
            return self._stopped(0)
        except NotMediaError:
            return self._failed(_with_detail("the encoder's output is not a media file", last), 0)
        except Exception as e:
            _log.failure("probing the output", Failure())
            return self._failed(f"could not check the output: {e}", 0)
        if duration is not None:
            slack = max(duration * self._profile.duration_tolerance, _MIN_DURATION_SLACK)
            if info.duration is None:
                return self._failed(
                    f"output duration unknown; input duration is {duration:.2f} s", 0
                )
            if abs(info.duration - duration) > slack:
                return self._failed(
                    f"output duration {info.duration:.2f} s does not match "
                    f"input duration {duration:.2f} s",
                    0,
                )
        try:
            digest = await self._interruptible(hashing)
        except CancelledError:
            return self._stopped(0)
        final = self._job_dir / f"result.{self._profile.output_extension}"
        os.replace(self._partial, final)
        output = OutputFile(
            size=final.stat().st_size,
            sha256=digest,
            media_type=self._profile.media_type,
            path=final.name,
            duration=info.duration,
        )
        return Outcome(JobState.SUCCEEDED, output, exit_code=0, log_tail=self._tail_text())

    def _hash(self, path: Path) -> Deferred[str]:
        if self._hash_file is not None:
            return self._hash_file(path)
        # Off the reactor thread: hashing a big result takes seconds.
        threads = IReactorThreads(self._reactor)
        return deferToThreadPool(threads, threads.getThreadPool(), _sha256_file, path)

    async def _interruptible(self, d: Deferred[_T]) -> _T:
        """Wait for C{d}, which L{_request_stop} cancels."""
        self._waiting = d  # type: ignore[assignment]
        try:
            return await d
        finally:
            self._waiting = None

    def _finish(self, outcome: Outcome) -> None:
        self._finished = True
        self._cancel_timers()
        if outcome.state is JobState.SUCCEEDED:
            self._report(100.0)
        else:
            try:
                self._partial.unlink(missing_ok=True)
            except OSError as e:
                _log.warn("cannot remove {path}: {error}", path=self._partial, error=e)
        self.deferred.callback(outcome)

    def _internal_error(self, failure: Failure) -> Outcome:
        _log.failure("job execution failed unexpectedly", failure)
        if self.pid is not None:
            self._signal(signal.SIGKILL)
            self.pid = None
        return self._failed(f"internal error: {failure.getErrorMessage()}")

    # Outcomes

    def _tail_text(self) -> str | None:
        return self._tail.text() if self._tail is not None else None

    def _failed(self, error: str, exit_code: int | None = None) -> Outcome:
        return Outcome(
            JobState.FAILED, exit_code=exit_code, error=error, log_tail=self._tail_text()
        )

    def _stopped(self, exit_code: int | None) -> Outcome:
        if self._stop == _Stop.CANCEL:
            return Outcome(JobState.CANCELLED, exit_code=exit_code, log_tail=self._tail_text())
        return self._failed(f"timed out after {_seconds(self._timeout)} s", exit_code)

    # Progress

    def _report_progress(self, percent: float) -> None:
        capped = min(percent, _BEFORE_DONE)
        # Steps of a tenth, the precision the API shows, so mencoder's many
        # status lines do not each become a callback.
        if capped >= self._progress + 0.1:
            self._report(capped)

    def _report(self, percent: float) -> None:
        self._progress = percent
        try:
            self._on_progress(percent)
        except Exception:
            _log.failure("on_progress raised")

    # Stopping

    def _timed_out(self) -> None:
        self._time_limit = None
        self._request_stop(_Stop.TIMEOUT)

    def _request_stop(self, why: str) -> None:
        if self._finished or self._stop is not None:
            return
        self._stop = why
        if self._waiting is not None:
            self._waiting.cancel()
        elif self.pid is not None:
            self._terminate()

    def _terminate(self) -> None:
        self._signal(signal.SIGTERM)
        self._kill_timer = self._clock.callLater(self._kill_grace, self._signal, signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            self._killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:
            _log.warn("cannot signal process group {pid}: {error}", pid=self.pid, error=e)

    def _cancel_timers(self) -> None:
        for timer in (self._time_limit, self._kill_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._time_limit = self._kill_timer = None


def execute_job(
    reactor: IReactorProcess,
    *,
    job_dir: Path,
    profile: Profile,
    inputs: Mapping[str, Path],
    params: Mapping[str, ParamValue],
    timeout: float | None,
    on_progress: Callable[[float], None],
    on_spawn: Callable[[int], None],
    kill_grace: float = 5.0,
    probe: ProbeFunction = ffprobe,
    hash_file: HashFunction | None = None,
    killpg: KillGroup = os.killpg,
    log_limit: int = LOG_LIMIT,
) -> IJobExecution:
    """
    Start running C{profile} on C{inputs}, writing into C{job_dir}.

    The inputs are probed first; the encoder then runs with C{job_dir} as its
    working and home directory, its output in C{result.partial.<ext>} and
    everything it prints in C{encoder.log}.  A checked output becomes
    C{result.<ext>}; any other ending removes it.

    @param reactor: must also provide L{IReactorTime}, and L{IReactorThreads}
        unless C{hash_file} is given.
    @param timeout: seconds from now (probing included) after which the
        encoder is stopped and the job fails; C{None} for no limit.
    @param on_progress: called with a growing percentage, below 100 until the
        output has been accepted, then with 100.
    @param on_spawn: called with the encoder's pid, which is also its process
        group id, right after it starts.
    @param kill_grace: seconds between TERM and KILL when stopping.
    @param probe: reads a media file (injectable for tests).
    @param hash_file: the SHA-256 of a file as hex, by default computed in the
        reactor's thread pool.
    @param killpg: signals a process group (injectable for tests).
    @param log_limit: bytes of output kept in the log.
    """
    execution = _Execution(
        reactor,
        job_dir,
        profile,
        inputs,
        params,
        timeout,
        on_progress,
        on_spawn,
        kill_grace,
        probe,
        hash_file,
        killpg,
        log_limit,
    )
    execution.start()
    return execution

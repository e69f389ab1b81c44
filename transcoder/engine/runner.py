"""
Run one job's encode: run the profile's encoder in a process group of its own
while ffprobe checks the inputs, watch it, and accept its output only after
checking it.

An encoder's exit status alone proves little: mencoder exits 0 after "encoding"
garbage it took for raw DV, and leaves a valid but truncated AVI when stopped.
So an output counts only if every input passed ffprobe, the output is media,
its duration matches the input's, and the file itself holds the frames its
header states (L{transcoder.engine.verify}): mencoder on a full disk exits 0 with a
header claiming 750 frames over a file holding 292.  Nor does an encode count
whose output filesystem fell below C{disk_reserve} bytes free while it ran or
when it exited, or whose encoder said "No space left on device": the job
fails as the disk being full, whatever the exit code.

What the output holds is read in-process from its container's own tables
(L{transcoder.engine.container}) when it is an AVI or MP4 the reader is sure of;
anything else is counted by ffprobe reading every packet.  An ffprobe run
there would be the one cost of the service that nothing overlaps: the output
is final only once the encoder has exited.

The inputs are probed beside the encoder, not before it: each ffprobe run
costs about 45 ms, which on a short encode is several percent of the job.
The probe still decides.  An input that is not media kills the encoder's
process group with SIGKILL at once; the job fails with "not a recognised
media file", exactly as if the encoder had never run:
no output, log or log tail of that encoder is kept.  And nothing is accepted
before every input probe has answered, so even an encoder quicker than the
probes (or one that "succeeds" on garbage) never makes garbage a result.
What the early start costs is an encoder reading a file that is not media for
the few tens of milliseconds of a probe; it reads untrusted files anyway.
Beside an encoder the probes run one after another, so that together they
take one core at most.

Only inputs whose first bytes look like a media container (L{looks_like_media})
start their encoder before the probe; anything else (random bytes, most of
all) waits for its probe, so that garbage costs no encoder at all.  Under a
load test of random-byte uploads, the early encoders had taken the status
polls' p99 from 129 to 160 ms (measured).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from transcoder.core.jobs import JobState, OutputFile
from transcoder.core.profiles import ParamValue, Profile
from transcoder.engine.container import read_contents
from transcoder.engine.probe import MediaInfo, NotMediaError, probe_counting, tool_env
from transcoder.engine.probe import probe as ffprobe
from transcoder.engine.progress import FfmpegBlock, FfmpegProgress, MencoderProgress
from transcoder.engine.runaway import runaway, too_long
from transcoder.engine.verify import Contents, from_probe, shortfall

LOG_NAME = "encoder.log"
LOG_LIMIT = 16 * 1024 * 1024
TAIL_LINES = 20
# Seconds all of a job's input probes may take together (each ffprobe also
# has its own limit: see probe.probe).
PROBE_BUDGET = 60.0
# Progress stays below this until the output has been checked.
_BEFORE_DONE = 99.9
# Durations are checked relatively, but never tighter than a few frames, so a
# very short input is not failed over one frame of rounding.
_MIN_DURATION_SLACK = 0.1
_MAX_TAIL_LINE = 300
_HASH_CHUNK = 1024 * 1024
# Seconds that reading an encoder's output rests after a read emptied a pipe,
# and the size its pipes are given so that they hold what it prints meanwhile:
# 10 MB/s of output, where mencoder's busiest (a stream copy) printed 4 MB/s.
READ_PAUSE = 0.1
PIPE_SIZE = 1024 * 1024
# What Twisted's process reader asks for at once: a read this long may have
# left more in the pipe.
_FULL_READ = 8192
# Bytes that must stay free on the output's filesystem while an encoder runs,
# and seconds between looks: an encoder that hit ENOSPC may still exit 0
# (mencoder does, its header claiming every frame it encoded).
DISK_RESERVE = 1024 * 1024
DISK_WATCH = 0.5
_NO_SPACE = b"No space left on device"

_log = Logger()
_T = TypeVar("_T")

# A file's inode, size and mtime: whether it changed since.
Fingerprint = tuple[int, int, int]


def fingerprint(path: Path) -> Fingerprint | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


ProbeFunction = Callable[[IReactorProcess, Path], Deferred[MediaInfo]]
HashFunction = Callable[[Path], Deferred[str]]
HeaderReader = Callable[[Path], Contents | None]
FreeSpace = Callable[[Path], int]
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
    DISK_FULL = "disk full"
    # The encode outgrew its input (see transcoder.engine.runaway).
    RUNAWAY = "runaway"


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


class _EncoderProtocol(ProcessProtocol):
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
        self.tail = _Tail(TAIL_LINES)
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


def _enlarge_pipes(transport: object) -> bool:
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    # One buffer read into again and again: a new bytes object per chunk
    # made hashing a 5 MB result a fifth slower (measured), and the hash is
    # now what the job waits for after its encoder.
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _abandon(d: Deferred[_T]) -> None:
    """Cancel C{d} if it is still waiting, and swallow whatever it ends with."""
    if not d.called:
        d.cancel()
    d.addErrback(lambda _: None)


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


def free_space(path: Path) -> int:
    """Bytes an unprivileged writer may still use on C{path}'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _with_detail(message: str, detail: str | None) -> str:
    return f"{message}: {detail}" if detail else message


# First bytes of the containers and streams the built-in profiles read.
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"FLV"),
    (4, b"ftyp"),  # MP4, MOV, 3GP, M4A
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"wide"),
    (4, b"free"),
    (0, b"RIFF"),  # AVI, WAV
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska, WebM
    (0, b"OggS"),
    (0, b"ID3"),  # MP3 with a tag
    (0, b"fLaC"),
    (0, b"\x00\x00\x01\xba"),  # MPEG program stream
    (0, b"\x00\x00\x01\xb3"),  # MPEG video
    (0, b"\x30\x26\xb2\x75"),  # ASF, WMV
)


def looks_like_media(path: Path) -> bool:
    """
    Whether C{path} starts like a media file: a hint for when to start the
    encoder, never a verdict (ffprobe gives that).
    """
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return True  # an MPEG audio frame: MP3 without a tag
    if head[:1] == b"\x47":
        return True  # an MPEG transport stream's sync byte
    return any(head[at : at + len(magic)] == magic for at, magic in _SIGNATURES)


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
        read_pause: float,
        sniff: Callable[[Path], bool],
        read_header: HeaderReader,
        count: ProbeFunction,
        disk_reserve: int,
        disk_free: FreeSpace,
        max_input_duration: float | None,
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
        self._read_pause = read_pause
        self._sniff = sniff
        self._read_header = read_header
        self._count = count
        self._disk_reserve = disk_reserve
        self._disk_free = disk_free
        # Bytes free at the last look at the output's filesystem.
        self._free: int | None = None
        self._disk_timer: IDelayedCall | None = None
        self._max_input_duration = max_input_duration
        self._runaway: str | None = None
        self._partial = job_dir / f"result.partial.{profile.output_extension}"
        self._stop: str | None = None
        self._finished = False
        self._progress = 0.0
        self._waiting: Deferred[object] | None = None
        self._time_limit: IDelayedCall | None = None
        self._kill_timer: IDelayedCall | None = None
        self._tail: _Tail | None = None
        self._transport: IProcessTransport | None = None
        self._parser: MencoderProgress | FfmpegProgress | None = None
        # What probing the inputs found: their infos, or why one was rejected
        # (the error message); None while the probes run.
        self._probed: list[MediaInfo] | str | None = None
        # The output's digest under way, and the output's state when it began.
        self._hashing: Deferred[str] | None = None
        self._hashed_as: Fingerprint | None = None
        self._probing: Deferred[list[MediaInfo] | str] | None = None

    # Public

    def cancel(self) -> None:
        self._request_stop(_Stop.CANCEL)

    # Flow

    def start(self) -> None:
        if self._timeout is not None:
            self._time_limit = self._clock.callLater(self._timeout, self._timed_out)
        # The encoder is spawned two turns of the reactor later: forking the
        # server takes milliseconds, and whoever started the job (an upload
        # answering 201) should not wait for it.  One turn is not enough: the
        # answer is queued in this turn and sent in the next turn's I/O,
        # which comes after that turn's timed calls.
        self._clock.callLater(0, self._clock.callLater, 0, self._begin)

    def _begin(self) -> None:
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(self._internal_error)
        d.addCallback(self._finish)

    async def _run(self) -> Outcome:
        if self._stop is not None:
            # Cancelled (or timed out) before its turn came: nothing to stop.
            return self._stopped(None)
        self._partial.unlink(missing_ok=True)
        for role in self._profile.inputs:
            if role not in self._inputs:
                return self._failed(f"missing input: {role}")
        if not all(self._sniff(self._inputs[role]) for role in self._profile.inputs):
            # Not recognisably media: the probes answer before any encoder runs.
            self._startProbes(together=True)
            try:
                early = await self._interruptible(self._startedProbes())
            except CancelledError:
                return self._stopped(None)
            if isinstance(early, str):
                return self._rejected(early)
        proto = self._spawn()
        if isinstance(proto, Outcome):
            return proto
        if self._probing is None:
            # The probes run beside the encoder (see the module's docstring).
            self._startProbes(together=False)
        exited = _exit_status(await proto.exited)
        if self._disk_timer is not None and self._disk_timer.active():
            self._disk_timer.cancel()
        self._disk_timer = None
        if self._stop is None and self._disk_short():
            # Whatever its exit code says, an encoder that filled the disk
            # may have lost writes.
            self._request_stop(_Stop.DISK_FULL)
        if exited == (0, None) and self._stop is None:
            # An output to check.  Its digest is computed (on a thread) from
            # the exit on, while the encoder's last output is read from its
            # pipes (2 ms of status lines on mux-avi), the input probes finish
            # and the output is checked.  A job that fails after all simply
            # does not use it.
            self._startHash()
        try:
            return await self._ended(proto)
        finally:
            if self._hashing is not None:
                _abandon(self._hashing)

    def _startHash(self) -> None:
        self._hashed_as = fingerprint(self._partial)
        self._hashing = self._hash(self._partial)

    async def _ended(self, proto: _EncoderProtocol) -> Outcome:
        """The outcome of an encoder whose process has exited: once its pipes are drained."""
        status = await proto.ended
        self.pid = None
        self._transport = None
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        exit_code, sig = _exit_status(status)
        if self._stop is None and self._tail is not None and self._tail.no_space:
            self._disk_short()  # for the figure
            self._stop = _Stop.DISK_FULL
        if self._stop is not None:
            return self._stopped(exit_code)
        if sig is not None or exit_code != 0:
            return await self._judge(exit_code, sig, None)
        # Exit 0 and no stop at processExited too (its status is this one):
        # the hash has been under way since then.  Unless the output changed
        # since: the pipes close when the last process holding them ends, and
        # a profile's encoder might have left a child writing the output.
        assert self._hashing is not None
        if fingerprint(self._partial) != self._hashed_as:
            _abandon(self._hashing)
            self._startHash()
        return await self._judge(exit_code, sig, self._hashing)

    async def _judge(
        self, exit_code: int | None, sig: int | None, hashing: Deferred[str] | None
    ) -> Outcome:
        """
        The outcome of an encoder that has exited by itself, once the input
        probes have answered; C{hashing} is the output's digest to come,
        C{None} unless the encoder exited 0.
        """
        try:
            # Still under the time limit: the input probes may outlast the encoder.
            probed = await self._interruptible(self._startedProbes())
        except CancelledError:
            return self._stopped(exit_code)
        self._cancel_timers()
        if isinstance(probed, str):
            return self._rejected(probed)
        last = self._tail.last_line() if self._tail is not None else None
        if sig is not None:
            return self._failed(_with_detail(f"encoder killed by signal {sig}", last), exit_code)
        if exit_code != 0 or hashing is None:
            return self._failed(
                _with_detail(f"encoder exited with code {exit_code}", last), exit_code
            )
        return await self._check_and_keep(probed[0].duration, last, hashing)

    def _startProbes(self, together: bool) -> None:
        self._probing = Deferred.fromCoroutine(self._probe_inputs(together))
        self._probing.addCallback(self._inputs_probed)

    def _startedProbes(self) -> Deferred[list[MediaInfo] | str]:
        """What the probes found, as a new Deferred each time it is awaited."""
        if self._probed is not None:
            return succeed(self._probed)
        assert self._probing is not None
        d: Deferred[list[MediaInfo] | str] = Deferred()

        def passOn(result: object) -> object:
            if not d.called:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)  # type: ignore[arg-type]
            return result

        self._probing.addBoth(passOn)
        return d

    async def _probe_inputs(self, together: bool) -> list[MediaInfo] | str:
        """
        Every input's L{MediaInfo}, in the profile's order, or why one is rejected.

        @param together: start every probe at once (nothing else runs: the
            encoder waits for them), rather than one after another (beside an
            encoder, on a machine of two cores, two probes at once slow it
            down: mux-avi's 80 ms encode with its two probes took 93 ms with
            the probes at once, 74 ms with one after the other).
        """
        roles = self._profile.inputs
        # One budget for all of them: one after another, each with ffprobe's
        # own limit, two stuck probes would take twice as long.
        deadline = self._clock.seconds() + PROBE_BUDGET
        started = [self._probeInput(role) for role in roles] if together else []
        infos: list[MediaInfo] = []
        try:
            for i, role in enumerate(roles):
                if i == len(started):
                    started.append(self._probeInput(role))
                waiting = started[i]
                waiting.addTimeout(max(0.0, deadline - self._clock.seconds()), self._clock)
                try:
                    info = await waiting
                except CancelledError:
                    raise
                except DeferredTimeoutError:
                    return f"probing the inputs took more than {PROBE_BUDGET:g} s"
                except NotMediaError:
                    return f"not a recognised media file: {role}"
                except Exception as e:
                    _log.failure("probing input {role}", Failure(), role=role)
                    return f"could not probe input {role}: {e}"
                refused = too_long(role, info.duration, self._max_input_duration)
                if refused is not None:
                    return refused
                infos.append(info)
        finally:
            for probing in started:
                _abandon(probing)
        return infos

    def _probeInput(self, role: str) -> Deferred[MediaInfo]:
        return maybeDeferred(self._probe, self._reactor, self._inputs[role])

    def _inputs_probed(self, probed: list[MediaInfo] | str) -> list[MediaInfo] | str:
        self._probed = probed
        if isinstance(probed, str):
            # Nothing the encoder makes of this input can be used: no grace.
            self._signal(signal.SIGKILL)
        elif self._parser is not None:
            self._parser.duration = probed[0].duration
        return probed

    def _spawn(self) -> _EncoderProtocol | Outcome:
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
        # The duration comes from the input probe, which runs beside the encoder.
        parser: MencoderProgress | FfmpegProgress | None = None
        if self._profile.progress == "mencoder":
            parser = MencoderProgress(None)
        elif self._profile.progress == "ffmpeg":
            parser = FfmpegProgress(None, on_block=self._watch_block)
        if parser is not None and isinstance(self._probed, list):
            # Probed before the spawn: the duration is known from the start.
            parser.duration = self._probed[0].duration
        self._parser = parser
        try:
            # Unbuffered: the log can be read while the encoder runs.
            log = (self._job_dir / LOG_NAME).open("wb", buffering=0)
        except OSError as e:
            return self._failed(f"cannot write the encoder log: {e}")
        proto = _EncoderProtocol(log, self._log_limit, parser, self._report_progress, self._clock)
        self._tail = proto.tail
        # util-linux setsid execs the encoder in place when its caller does
        # not lead a process group (a freshly spawned child never does), so
        # the pid we get is the encoder's and also its process group id.
        executable, args = setsid, ["setsid", *argv]
        cwd: str | None = str(self._job_dir)
        chdir = env_chdir()
        if chdir is not None:
            # Given a working directory, Twisted forks, and the child runs
            # Python until its exec: 5 to 6 ms from fork to setsid's exec here.
            # Without one it uses posix_spawn, and GNU env sets the directory.
            executable, args = chdir, ["env", "-C", str(self._job_dir), setsid, *argv]
            cwd = None
        try:
            transport = self._reactor.spawnProcess(
                proto,
                executable,
                args,
                env=env,
                path=cwd,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            proto.close_log()
            return self._failed(f"cannot start the encoder: {e}")
        transport.closeStdin()
        if self._read_pause > 0 and _enlarge_pipes(transport):
            proto.rest(self._read_pause)
        self._transport = transport
        self.pid = transport.pid
        self._disk_timer = self._clock.callLater(DISK_WATCH, self._watch_disk)
        if self.pid is not None:
            try:
                self._on_spawn(self.pid)
            except Exception:
                _log.failure("on_spawn raised")
        if self._stop is not None:
            self._terminate()
        return proto

    async def _check_and_keep(
        self, duration: float | None, last: str | None, hashing: Deferred[str]
    ) -> Outcome:
        """Check the encoder's output and, if it passes, make it the result."""
        try:
            # A few small reads of a file just written, in the page cache.
            contents: Contents | None = self._read_header(self._partial)
        except Exception:
            _log.failure("reading the output's header")
            contents = None
        if contents is None:
            try:
                info = await self._interruptible(
                    maybeDeferred(self._count, self._reactor, self._partial)
                )
            except CancelledError:
                return self._stopped(0)
            except NotMediaError:
                return self._failed(
                    _with_detail("the encoder's output is not a media file", last), 0
                )
            except Exception as e:
                _log.failure("probing the output", Failure())
                return self._failed(f"could not check the output: {e}", 0)
            contents = from_probe(info)
        stated = contents.duration
        tolerance = self._profile.duration_tolerance
        if duration is not None:
            slack = max(duration * tolerance, _MIN_DURATION_SLACK)
            if stated is None:
                return self._failed(
                    f"output duration unknown; input duration is {duration:.2f} s", 0
                )
            if abs(stated - duration) > slack:
                return self._failed(
                    f"output duration {stated:.2f} s does not match "
                    f"input duration {duration:.2f} s",
                    0,
                )
        else:
            slack = max((stated or 0.0) * tolerance, _MIN_DURATION_SLACK)
        missing = shortfall(contents, slack)
        if missing is not None:
            return self._failed(missing, 0)
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
            duration=stated,
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
        if self._probing is not None:
            _abandon(self._probing)
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

    def _rejected(self, error: str) -> Outcome:
        """
        An input failed its probe: the job fails as if no encoder had run,
        so nothing that encoder printed (it was reading garbage, and was
        killed for it) is kept to mislead.
        """
        try:
            (self._job_dir / LOG_NAME).unlink(missing_ok=True)
        except OSError as e:
            _log.warn("cannot remove the encoder log: {error}", error=e)
        return Outcome(JobState.FAILED, error=error)

    def _stopped(self, exit_code: int | None) -> Outcome:
        if self._stop == _Stop.CANCEL:
            return Outcome(JobState.CANCELLED, exit_code=exit_code, log_tail=self._tail_text())
        if self._stop == _Stop.DISK_FULL:
            free = "?" if self._free is None else str(self._free)
            message = f"the data disk is full ({free} bytes free); output discarded"
            if self._tail is not None and self._tail.no_space:
                # The encoder's own words, "No space left on device".
                message = _with_detail(message, self._tail.last_line())
            return self._failed(message, exit_code)
        if self._stop == _Stop.RUNAWAY and self._runaway is not None:
            return self._failed(self._runaway, exit_code)
        return self._failed(f"timed out after {_seconds(self._timeout)} s", exit_code)

    # Progress

    def _report_progress(self, percent: float) -> None:
        if not isinstance(self._probed, list):
            # Until the probe gives the duration, mencoder has only its byte
            # figure, which starts well above zero: reported, it would hold
            # the bar up until the real position caught up.
            return
        capped = min(percent, _BEFORE_DONE)
        # Steps of a tenth, the precision the API shows, so mencoder's many
        # status lines do not each become a callback.
        if capped >= self._progress + 0.1:
            self._report(capped)

    def _watch_block(self, block: FfmpegBlock) -> None:
        """Stop an encode that has outgrown its input (L{transcoder.engine.runaway})."""
        if self._finished or self._stop is not None:
            return
        duration = self._probed[0].duration if isinstance(self._probed, list) else None
        why = runaway(block, duration, self._profile.duration_tolerance)
        if why is not None:
            self._runaway = why
            self._request_stop(_Stop.RUNAWAY)

    def _report(self, percent: float) -> None:
        self._progress = percent
        try:
            self._on_progress(percent)
        except Exception:
            _log.failure("on_progress raised")

    # Stopping

    def _watch_disk(self) -> None:
        self._disk_timer = None
        if self._finished or self.pid is None or self._stop is not None:
            return
        if self._disk_short():
            self._request_stop(_Stop.DISK_FULL)
        else:
            self._disk_timer = self._clock.callLater(DISK_WATCH, self._watch_disk)

    def _disk_short(self) -> bool:
        """Whether the output's filesystem has less than the reserve free."""
        try:
            self._free = self._disk_free(self._job_dir)
        except OSError as e:
            _log.warn("cannot read the free space of {path}: {error}", path=self._job_dir, error=e)
            return False
        return self._free < self._disk_reserve

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
            if why == _Stop.RUNAWAY:
                # Nothing it made is wanted, and ffmpeg ignores TERM while it
                # repeats a frame: no grace.
                self._signal(signal.SIGKILL)
            else:
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
            # No such group yet: a stop right after the spawn can come before
            # setsid has run in the child.  The transport signals the child
            # itself, and knows (unlike a bare pid) whether it was reaped.
            if self._transport is not None:
                try:
                    self._transport.signalProcess(sig)
                except (ProcessExitedAlready, OSError):
                    pass
        except OSError as e:
            _log.warn("cannot signal process group {pid}: {error}", pid=self.pid, error=e)

    def _cancel_timers(self) -> None:
        for timer in (self._time_limit, self._kill_timer, self._disk_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._time_limit = self._kill_timer = self._disk_timer = None


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
    read_pause: float = READ_PAUSE,
    sniff: Callable[[Path], bool] = looks_like_media,
    read_header: HeaderReader = read_contents,
    count: ProbeFunction = probe_counting,
    disk_reserve: int = DISK_RESERVE,
    disk_free: FreeSpace = free_space,
    max_input_duration: float | None = None,
) -> IJobExecution:
    """
    Start running C{profile} on C{inputs}, writing into C{job_dir}.

    The encoder starts two reactor turns later, with C{job_dir} as its working and home
    directory, its output in C{result.partial.<ext>} and everything it prints
    in C{encoder.log}, while the inputs are probed beside it; an input that is
    not media stops it and fails the job.  A checked output becomes
    C{result.<ext>}; any other ending removes it.

    @param reactor: must also provide L{IReactorTime}, and L{IReactorThreads}
        unless C{hash_file} is given.
    @param timeout: seconds from now (probing included) after which the
        encoder is stopped and the job fails; C{None} for no limit.
    @param on_progress: called with a growing percentage, below 100 until the
        output has been accepted, then with 100; nothing before the inputs'
        probes have answered.
    @param on_spawn: called with the encoder's pid, which is also its process
        group id, right after it starts.
    @param kill_grace: seconds between TERM and KILL when stopping.
    @param probe: reads a media file (injectable for tests).
    @param hash_file: the SHA-256 of a file as hex, by default computed in the
        reactor's thread pool.
    @param killpg: signals a process group (injectable for tests).
    @param log_limit: bytes of output kept in the log.
    @param read_pause: seconds that reading the encoder's output rests after
        a read that emptied the pipes (0: read as it comes).
    @param sniff: whether an input looks like media by its first bytes; if
        any does not, the encoder waits for the probes.
    @param read_header: what the output holds as its container's own tables
        say (L{transcoder.engine.container}), or C{None} to have C{count} read it
        instead.
    @param count: reads a media file counting its packets (for the output).
    @param disk_reserve: bytes that must stay free on C{job_dir}'s filesystem
        while the encoder runs and when it exits; below that the encoder's
        process group is stopped and the job fails as the disk being full,
        as it does when the encoder says "No space left on device".
    @param disk_free: the bytes free on a path's filesystem (injectable for
        tests), looked at every L{DISK_WATCH} seconds.
    @param max_input_duration: seconds; an input that probes longer fails the
        job as a rejected input (see L{transcoder.engine.runaway}); C{None}: no limit.
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
        read_pause,
        sniff,
        read_header,
        count,
        disk_reserve,
        disk_free,
        max_input_duration,
    )
    execution.start()
    return execution

"""
Run one job's encode: run the profile's encoder in a process group of its own
(L{transcoder.engine.process}) while ffprobe checks the inputs
(L{transcoder.engine.inputs}), watch it, and accept its output only after
checking it (L{transcoder.engine.outcome}).

An output counts only if every input passed ffprobe and the output passed
its checks.  Nor does an encode count whose output filesystem fell below
C{disk_reserve} bytes free while it ran or when it exited
(L{transcoder.engine.disk}), or whose encoder said "No space left on device":
the job fails as the disk being full, whatever the exit code.

The inputs are probed beside the encoder, not before it, when their first
bytes look like media (L{transcoder.engine.sniff}); otherwise the encoder
waits for them, so that garbage costs no encoder at all.  The probe still
decides.  An input that is not media kills the encoder's process group with
SIGKILL at once; the job fails with "not a recognised media file", exactly as
if the encoder had never run: no output, log or log tail of that encoder is
kept.  And nothing is accepted before every input probe has answered, so
even an encoder quicker than the probes (or one that "succeeds" on garbage)
never makes garbage a result.  What the early start costs is an encoder
reading a file that is not media for the few tens of milliseconds of a
probe; it reads untrusted files anyway.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorThreads,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from transcoder.core.files import remove
from transcoder.core.jobs import JobState
from transcoder.core.profiles import ParamValue, Profile
from transcoder.engine.container import read_contents
from transcoder.engine.deferreds import abandon
from transcoder.engine.digest import Fingerprint, HashFunction, fingerprint, hash_in_pool
from transcoder.engine.disk import DISK_RESERVE, DiskWatch, FreeSpace, free_space
from transcoder.engine.inputs import InputProbes, Probed, ProbeFunction
from transcoder.engine.ladder import probed_values
from transcoder.engine.outcome import HeaderReader, Outcome, with_detail
from transcoder.engine.outputs import accept_any, partial_path
from transcoder.engine.probe import probe as ffprobe
from transcoder.engine.probe import probe_counting, tool_env
from transcoder.engine.process import (
    LOG_LIMIT,
    LOG_NAME,
    EncoderProtocol,
    KillGroup,
    Tail,
    exit_status,
    signal_group,
    spawn_encoder,
)
from transcoder.engine.progress import FfmpegBlock, FfmpegProgress, MencoderProgress
from transcoder.engine.runaway import runaway
from transcoder.engine.settings import Limits, Tools
from transcoder.engine.sniff import looks_like_media

# Progress stays below this until the output has been checked.
_BEFORE_DONE = 99.9

_log = Logger()
_T = TypeVar("_T")


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


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


@implementer(IJobExecution)
class _Execution:
    def __init__(
        self,
        reactor: IReactorProcess,
        job_dir: Path,
        profile: Profile,
        inputs: Mapping[str, Path],
        params: Mapping[str, ParamValue],
        on_progress: Callable[[float], None],
        on_spawn: Callable[[int], None],
        tools: Tools,
        limits: Limits,
        attempt: int = 0,
    ) -> None:
        self.deferred: Deferred[Outcome] = Deferred()
        self.pid: int | None = None
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._job_dir = job_dir
        self._profile = profile
        self._inputs = dict(inputs)
        self._params = dict(params)
        self._on_progress = on_progress
        self._on_spawn = on_spawn
        self._tools = tools
        self._limits = limits
        self._disk = DiskWatch(
            self._clock,
            job_dir,
            limits.disk_reserve,
            tools.disk_free,
            wanted=lambda: not self._finished and self.pid is not None and self._stop is None,
            on_short=lambda: self._request_stop(_Stop.DISK_FULL),
        )
        self._probes = InputProbes(
            reactor,
            tools.probe,
            self._inputs,
            profile.inputs,
            limits.max_input_duration,
            self._inputs_probed,
            profile.needs,
        )
        self._runaway: str | None = None
        # Each attempt (with several nodes) writes under its own names: a node
        # that lost the job never writes over the one that took it over.
        self._partial = partial_path(job_dir, profile, attempt)
        self._stop: str | None = None
        self._finished = False
        self._progress = 0.0
        self._waiting: Deferred[object] | None = None
        self._time_limit: IDelayedCall | None = None
        self._kill_timer: IDelayedCall | None = None
        self._tail: Tail | None = None
        self._transport: IProcessTransport | None = None
        self._parser: MencoderProgress | FfmpegProgress | None = None
        # The output's digest under way, and the output's state when it began.
        self._hashing: Deferred[str] | None = None
        self._hashed_as: Fingerprint | None = None

    # Public

    def cancel(self) -> None:
        self._request_stop(_Stop.CANCEL)

    # Flow

    def start(self) -> None:
        if self._limits.timeout is not None:
            self._time_limit = self._clock.callLater(self._limits.timeout, self._timed_out)
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
        remove(self._partial)
        if self._profile.multi_output:
            self._partial.mkdir()
        for role in self._profile.inputs:
            if role not in self._inputs:
                return self._failed(f"missing input: {role}")
        sniffed = all(self._tools.sniff(self._inputs[role]) for role in self._profile.inputs)
        if not sniffed or self._profile.probe_first:
            # Not recognisably media, or the argv needs what the probes
            # learn: the probes answer before any encoder runs.
            self._probes.start(together=True)
            try:
                early = await self._interruptible(self._probes.answer())
            except CancelledError:
                return self._stopped(None)
            if isinstance(early, str):
                return self._rejected(early)
        proto = self._spawn()
        if isinstance(proto, Outcome):
            return proto
        if not self._probes.started:
            # The probes run beside the encoder (see the module's docstring).
            self._probes.start(together=False)
        exited = exit_status(await proto.exited)
        self._disk.stop()
        if self._stop is None and self._disk.short():
            # Whatever its exit code says, an encoder that filled the disk
            # may have lost writes.
            self._request_stop(_Stop.DISK_FULL)
        if exited == (0, None) and self._stop is None:
            # An output to check.  Its digest is computed (on a thread) from
            # the exit on, while the encoder's last output is read from its
            # pipes (2 ms of status lines on mux-avi), the input probes finish
            # and the output is checked.  A job that fails after all simply
            # does not use it.
            self._start_hash()
        try:
            return await self._ended(proto)
        finally:
            if self._hashing is not None:
                abandon(self._hashing)

    def _start_hash(self) -> None:
        self._hashed_as = fingerprint(self._partial)
        # Several outputs are hashed one by one once they have passed.
        multi = self._profile.multi_output
        self._hashing = succeed("") if multi else self._hash(self._partial)

    async def _ended(self, proto: EncoderProtocol) -> Outcome:
        """The outcome of an encoder whose process has exited: once its pipes are drained."""
        status = await proto.ended
        self.pid = None
        self._transport = None
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        exit_code, sig = exit_status(status)
        if self._stop is None and self._tail is not None and self._tail.no_space:
            self._disk.short()  # for the figure
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
            abandon(self._hashing)
            self._start_hash()
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
            probed = await self._interruptible(self._probes.answer())
        except CancelledError:
            return self._stopped(exit_code)
        self._cancel_timers()
        if isinstance(probed, str):
            return self._rejected(probed)
        last = self._tail.last_line() if self._tail is not None else None
        if sig is not None:
            return self._failed(with_detail(f"encoder killed by signal {sig}", last), exit_code)
        if exit_code != 0 or hashing is None:
            return self._failed(
                with_detail(f"encoder exited with code {exit_code}", last), exit_code
            )
        return await self._check_and_keep(probed[0].duration, last, hashing)

    def _inputs_probed(self, probed: Probed) -> None:
        if isinstance(probed, str):
            # Nothing the encoder makes of this input can be used: no grace.
            self._signal(signal.SIGKILL)
        elif self._parser is not None:
            self._parser.duration = probed[0].duration

    def _spawn(self) -> EncoderProtocol | Outcome:
        try:
            argv = self._profile.build_argv(
                {role: str(path) for role, path in self._inputs.items()},
                output=str(self._partial),
                params=self._params,
                probed=probed_values(self._profile, self._params, self._probes.probed),
            )
        except KeyError as e:
            return self._failed(f"missing parameter: {e.args[0]}")
        env = tool_env(home=self._job_dir)
        if shutil.which(argv[0], path=env["PATH"]) is None:
            return self._failed(f"encoder not found: {argv[0]}")
        # The duration comes from the input probe, which runs beside the encoder.
        parser: MencoderProgress | FfmpegProgress | None = None
        if self._profile.progress == "mencoder":
            parser = MencoderProgress(None)
        elif self._profile.progress == "ffmpeg":
            parser = FfmpegProgress(None, on_block=self._watch_block)
        probed = self._probes.probed
        if parser is not None and isinstance(probed, list):
            # Probed before the spawn: the duration is known from the start.
            parser.duration = probed[0].duration
        self._parser = parser
        try:
            # Unbuffered: the log can be read while the encoder runs.
            log = (self._job_dir / LOG_NAME).open("wb", buffering=0)
        except OSError as e:
            return self._failed(f"cannot write the encoder log: {e}")
        proto = EncoderProtocol(
            log, self._limits.log_limit, parser, self._report_progress, self._clock
        )
        self._tail = proto.tail
        try:
            transport = spawn_encoder(self._reactor, proto, argv, self._job_dir, env)
        except OSError as e:
            proto.close_log()
            return self._failed(f"cannot start the encoder: {e}")
        self._transport = transport
        self.pid = transport.pid
        self._disk.start()
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
        """Check the encoder's output (or outputs) and, if it passes, make it the result."""
        try:
            output = await accept_any(
                self._partial,
                self._profile,
                self._params,
                duration,
                hashing,
                tools=self._tools,
                reactor=self._reactor,
                hash_file=self._hash,
                wait=self._interruptible,
                last=last,
            )
        except CancelledError:
            return self._stopped(0)
        if isinstance(output, str):
            return self._failed(output, 0)
        many = output if isinstance(output, list) else []
        one = output if not isinstance(output, list) else None
        return Outcome(JobState.SUCCEEDED, one, 0, outputs=many, log_tail=self._tail_text())

    def _hash(self, path: Path) -> Deferred[str]:
        if self._tools.hash_file is not None:
            return self._tools.hash_file(path)
        return hash_in_pool(IReactorThreads(self._reactor), path)

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
        self._probes.abandon()
        outcome.inputs_media = self._probes.described()
        if outcome.state is JobState.SUCCEEDED:
            self._report(100.0)
        else:
            remove(self._partial)
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
            free = "?" if self._disk.free is None else str(self._disk.free)
            message = f"the data disk is full ({free} bytes free); output discarded"
            if self._tail is not None and self._tail.no_space:
                # The encoder's own words, "No space left on device".
                message = with_detail(message, self._tail.last_line())
            return self._failed(message, exit_code)
        if self._stop == _Stop.RUNAWAY and self._runaway is not None:
            return self._failed(self._runaway, exit_code)
        return self._failed(f"timed out after {_seconds(self._limits.timeout)} s", exit_code)

    # Progress

    def _report_progress(self, percent: float) -> None:
        if not isinstance(self._probes.probed, list):
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
        probed = self._probes.probed
        duration = probed[0].duration if isinstance(probed, list) else None
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
        self._kill_timer = self._clock.callLater(
            self._limits.kill_grace, self._signal, signal.SIGKILL
        )

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            signal_group(self._tools.killpg, self.pid, self._transport, sig)

    def _cancel_timers(self) -> None:
        for timer in (self._time_limit, self._kill_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._time_limit = self._kill_timer = None
        self._disk.stop()


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
    sniff: Callable[[Path], bool] = looks_like_media,
    read_header: HeaderReader = read_contents,
    count: ProbeFunction = probe_counting,
    disk_reserve: int = DISK_RESERVE,
    disk_free: FreeSpace = free_space,
    max_input_duration: float | None = None,
    attempt: int = 0,
) -> IJobExecution:
    """
    Start running C{profile} on C{inputs}, writing into C{job_dir}.

    The encoder starts two reactor turns later, with C{job_dir} as its working and home
    directory, its output in C{result.partial.<ext>} and everything it prints
    in C{encoder.log}, while the inputs are probed beside it; an input that is
    not media stops it and fails the job.  A checked output becomes
    C{result.<ext>}; any other ending removes it.

    The other keywords are the fields of L{Limits} (C{kill_grace},
    C{log_limit}, C{disk_reserve}, C{max_input_duration}) and
    of L{Tools} (C{probe}, C{count}, C{hash_file}, C{killpg}, C{sniff},
    C{read_header}, C{disk_free}), described there.

    @param reactor: must also provide L{IReactorTime}, and L{IReactorThreads}
        unless C{hash_file} is given.
    @param timeout: seconds from now (probing included) after which the
        encoder is stopped and the job fails; C{None} for no limit.
    @param on_progress: called with a growing percentage, below 100 until the
        output has been accepted, then with 100; nothing before the inputs'
        probes have answered.
    @param on_spawn: called with the encoder's pid, which is also its process
        group id, right after it starts.
    @param attempt: which run of the job this is, when several nodes share
        it (0: one node): its output is C{result.partial.<attempt>.<ext>},
        then C{result.<attempt>.<ext>}.
    """
    execution = _Execution(
        reactor,
        job_dir,
        profile,
        inputs,
        params,
        on_progress,
        on_spawn,
        Tools(
            probe=probe,
            count=count,
            hash_file=hash_file,
            killpg=killpg,
            sniff=sniff,
            read_header=read_header,
            disk_free=disk_free,
        ),
        Limits(
            timeout=timeout,
            kill_grace=kill_grace,
            log_limit=log_limit,
            disk_reserve=disk_reserve,
            max_input_duration=max_input_duration,
        ),
        attempt,
    )
    execution.start()
    return execution

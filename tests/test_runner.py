"""
Unit tests for transcoder.engine.runner, without spawning anything: a fake reactor
records the spawn, the tests play the encoder's part through the protocol, and
Clock.advance stands in for the passing of time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from transcoder.core.jobs import JobState
from transcoder.core.profiles import Profile
from transcoder.engine.disk import DISK_WATCH
from transcoder.engine.inputs import PROBE_BUDGET
from transcoder.engine.outcome import Outcome
from transcoder.engine.probe import MediaInfo, NotMediaError, StreamInfo
from transcoder.engine.runner import IJobExecution, execute_job
from transcoder.engine.sniff import looks_like_media
from transcoder.engine.verify import Contents, Held
from transcoder.testing import FakeReactor


def _info(duration: float | None, *types: str) -> MediaInfo:
    return MediaInfo(duration, "avi", tuple(StreamInfo(t, "codec") for t in types or ("video",)))


@dataclass
class Harness:
    """One execute_job call under test, with everything it reports recorded."""

    job_dir: Path
    reactor: FakeReactor = field(default_factory=FakeReactor)
    # What the fake probe answers for a file name: a MediaInfo, an exception,
    # or a Deferred left for the test to fire.
    answers: dict[str, MediaInfo | Exception | Deferred[MediaInfo]] = field(default_factory=dict)
    probed: list[Path] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)
    spawns: list[int] = field(default_factory=list)
    killed: list[tuple[int, int]] = field(default_factory=list)
    # Process groups killpg finds no trace of (setsid not yet run in the child).
    no_group: set[int] = field(default_factory=set)
    outcomes: list[Outcome] = field(default_factory=list)
    execution: Any = None

    def probe(self, reactor: IReactorProcess, path: Path) -> Deferred[MediaInfo]:
        self.probed.append(path)
        answer = self.answers[path.name]
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def killpg(self, pgid: int, sig: int) -> None:
        if pgid in self.no_group:
            raise ProcessLookupError(pgid)
        self.killed.append((pgid, sig))

    def start(self, profile: Profile, inputs: dict[str, str], **kw: Any) -> Any:
        kw.setdefault("hash_file", lambda p: succeed(hashlib.sha256(p.read_bytes()).hexdigest()))
        self.launch(profile, inputs, **kw)
        # The encoder is spawned two turns of the reactor later (one advance).
        self.reactor.advance(0)
        return self.execution

    def launch(self, profile: Profile, inputs: dict[str, str], **kw: Any) -> Any:
        """execute_job, its outcome recorded, without letting the reactor turn."""
        kw.setdefault("timeout", None)
        # These inputs are not on disk: take them as media-looking, so the
        # encoder starts beside its probes (the sniffing has tests of its own).
        kw.setdefault("sniff", lambda path: True)
        self.execution = execute_job(
            self.reactor,
            job_dir=self.job_dir,
            profile=profile,
            inputs={role: self.job_dir / name for role, name in inputs.items()},
            params=kw.pop("params", {"vbitrate": 900}),
            on_progress=self.progress.append,
            on_spawn=self.spawns.append,
            probe=self.probe,
            count=kw.pop("count", self.probe),
            killpg=self.killpg,
            **kw,
        )
        self.execution.deferred.addCallback(self.outcomes.append)
        return self.execution

    @property
    def proto(self) -> ProcessProtocol:
        proto: ProcessProtocol = self.reactor.spawned[-1]["proto"]
        return proto

    def output(self, data: bytes = b"encoded bytes") -> Path:
        """Play the encoder writing its output."""
        partial = self.job_dir / "result.partial.avi"
        partial.write_bytes(data)
        return partial

    def end(self, exit_code: int = 0, sig: int | None = None) -> None:
        if exit_code == 0 and sig is None:
            self.proto.processEnded(Failure(ProcessDone(0)))
        else:
            self.proto.processEnded(
                Failure(ProcessTerminated(exitCode=None if sig else exit_code, signal=sig))
            )


@dataclass
class HeldHash:
    """A C{hash_file} that records what it was asked to hash, and answers when the test fires C{digest}."""

    digest: Deferred[str] = field(default_factory=Deferred)
    paths: list[Path] = field(default_factory=list)

    def __call__(self, path: Path) -> Deferred[str]:
        self.paths.append(path)
        return self.digest


MENCODER = Profile(
    name="t-mencoder",
    description="",
    executable="mencoder",
    argv=("{file}", "-ovc", "lavc", "-lavcopts", "vbitrate={vbitrate}", "-o", "{output}"),
    output_extension="avi",
    media_type="video/x-msvideo",
    progress="mencoder",
)
FFMPEG = Profile(
    name="t-ffmpeg",
    description="",
    executable="ffmpeg",
    argv=("-progress", "pipe:1", "-i", "{file}", "{output}"),
    output_extension="avi",
    media_type="video/x-msvideo",
    progress="ffmpeg",
)
MUX = Profile(
    name="t-mux",
    description="",
    executable="mencoder",
    argv=("{video}", "-audiofile", "{audio}", "-o", "{output}"),
    inputs=("video", "audio"),
    output_extension="avi",
    progress="mencoder",
)


def _pos(seconds: float, percent: int = 30) -> bytes:
    return b"Pos: %5.1fs %6df (%2d%%)  0.00fps Trem:   0min   0mb  A-V:0.000 [0:0]\r" % (
        seconds,
        int(seconds * 25),
        percent,
    )


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.answers.update(
        {"in.mp4": _info(10.0, "video", "audio"), "result.partial.avi": _info(10.0)}
    )
    return harness


def test_spawn_through_setpriv_and_setsid(h: Harness) -> None:
    """
    The encoder starts as C{setpriv --pdeathsig KILL setsid <argv>} (it dies
    with the node, in a process group of its own), in the job directory,
    with stdin closed and a small explicit environment.
    """
    execution = h.start(MENCODER, {"file": "in.mp4"}, params={"vbitrate": 900})
    verifyObject(IJobExecution, execution)
    [spawned] = h.reactor.spawned
    assert os.path.basename(spawned["executable"]) == "setpriv"
    setsid = spawned["args"][3]
    assert os.path.basename(setsid) == "setsid" and os.path.isabs(setsid)
    assert spawned["args"] == [
        *("setpriv", "--pdeathsig", "KILL", setsid),
        "mencoder",
        str(h.job_dir / "in.mp4"),
        *("-ovc", "lavc", "-lavcopts", "vbitrate=900", "-o"),
        str(h.job_dir / "result.partial.avi"),
    ]
    assert spawned["path"] == str(h.job_dir)
    env = spawned["env"]
    assert env["PATH"] == os.environ["PATH"]
    assert env["HOME"] == str(h.job_dir)
    assert env["LANG"] == "C.UTF-8"
    assert set(env) == {"PATH", "HOME", "LANG"}
    assert h.proto.transport.stdin_closed  # type: ignore[union-attr]
    assert h.spawns == [90000]
    assert execution.pid == 90000
    assert h.probed == [h.job_dir / "in.mp4"]


def test_spawn_without_setpriv_as_before(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where setpriv is not on PATH the encoder starts as C{setsid <argv>}, as before issue 16."""
    bin_dir = h.job_dir.parent / "bin-without-setpriv"
    bin_dir.mkdir()
    for tool in ("mencoder", "setsid"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    h.start(MENCODER, {"file": "in.mp4"}, params={"vbitrate": 900})
    [spawned] = h.reactor.spawned
    assert spawned["executable"] == str(bin_dir / "setsid")
    assert spawned["args"][:2] == ["setsid", "mencoder"]
    assert h.spawns == [90000]


def test_probes_beside_the_encoder_run_one_after_another(h: Harness) -> None:
    """Beside a running encoder, the second input's probe starts only once the first has answered."""
    video: Deferred[MediaInfo] = Deferred()
    audio: Deferred[MediaInfo] = Deferred()
    h.answers.update({"v.flv": video, "a.mp3": audio})
    h.start(MUX, {"video": "v.flv", "audio": "a.mp3"})
    assert len(h.reactor.spawned) == 1
    assert h.probed == [h.job_dir / "v.flv"]
    video.callback(_info(10.0))
    assert h.probed == [h.job_dir / "v.flv", h.job_dir / "a.mp3"]
    audio.callback(_info(10.0, "audio"))
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED


def test_probes_share_one_time_budget(h: Harness) -> None:
    """
    The input probes share one budget (PROBE_BUDGET): with the first taking
    40 s of it, the second is stopped 20 s later, not 60, and the job is
    rejected saying so; its encoder is killed.
    """
    video: Deferred[MediaInfo] = Deferred()
    audio: Deferred[MediaInfo] = Deferred()
    h.answers.update({"v.flv": video, "a.mp3": audio})
    h.start(MUX, {"video": "v.flv", "audio": "a.mp3"})
    h.reactor.advance(40)
    video.callback(_info(10.0))
    h.reactor.advance(PROBE_BUDGET - 40 - 0.5)
    assert not audio.called
    h.reactor.advance(0.5)
    assert audio.called, "the second probe was cancelled (which kills its ffprobe)"
    assert h.killed[-1][1] == signal.SIGKILL
    h.end(sig=signal.SIGKILL)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == f"probing the inputs took more than {PROBE_BUDGET:g} s"


def test_probes_before_the_encoder_run_together(h: Harness) -> None:
    """With no encoder running yet (an input that does not look like media), every input is probed at once."""
    video: Deferred[MediaInfo] = Deferred()
    audio: Deferred[MediaInfo] = Deferred()
    h.answers.update({"v.flv": video, "a.mp3": audio})
    h.start(MUX, {"video": "v.flv", "audio": "a.mp3"}, sniff=lambda path: False)
    assert h.probed == [h.job_dir / "v.flv", h.job_dir / "a.mp3"]
    assert h.reactor.spawned == []
    audio.callback(_info(10.0, "audio"))
    video.callback(_info(10.0))
    assert len(h.reactor.spawned) == 1


def test_spawn_waits_two_turns(h: Harness) -> None:
    """execute_job returns before the encoder is spawned, which happens two reactor turns later: whoever started the job (an upload answering 201) gets its answer written before the fork."""
    execution = h.launch(MENCODER, {"file": "in.mp4"})
    assert h.reactor.spawned == []
    # A Clock runs both turns' calls in one advance.
    h.reactor.advance(0)
    assert len(h.reactor.spawned) == 1
    assert execution.pid == 90000


def test_cancel_before_the_spawn_turn_spawns_nothing(h: Harness) -> None:
    """A job cancelled before its encoder's turn came ends cancelled, and no encoder is ever spawned."""
    execution = h.launch(MENCODER, {"file": "in.mp4"})
    execution.cancel()
    h.reactor.advance(0)
    assert h.reactor.spawned == []
    assert [o.state for o in h.outcomes] == [JobState.CANCELLED]


def test_success(h: Harness) -> None:
    """Exit 0 with an output of the right duration: the result is renamed, hashed and reported."""
    h.start(MENCODER, {"file": "in.mp4"})
    (h.job_dir / "result.avi").write_bytes(b"stale")
    data = b"\x00avi bytes" * 1000
    h.output(data)
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.exit_code == 0 and outcome.error is None
    assert outcome.output is not None
    assert outcome.output.path == "result.avi"
    assert outcome.output.size == len(data)
    assert outcome.output.sha256 == hashlib.sha256(data).hexdigest()
    assert outcome.output.media_type == "video/x-msvideo"
    assert outcome.output.duration == 10.0
    assert (h.job_dir / "result.avi").read_bytes() == data
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.probed[-1] == h.job_dir / "result.partial.avi"
    assert h.progress[-1] == 100.0
    assert h.execution.pid is None
    assert h.reactor.getDelayedCalls() == []


def test_progress_monotonic_below_100(h: Harness) -> None:
    """Progress is Pos over the duration, never goes back, and stays below 100 until success."""
    h.start(MENCODER, {"file": "in.mp4"})
    h.proto.childDataReceived(1, _pos(1.0) + _pos(2.5)[:20])
    assert h.progress == [10.0]
    h.proto.childDataReceived(1, _pos(2.5)[20:])
    h.proto.childDataReceived(1, _pos(2.0))
    h.proto.childDataReceived(2, _pos(9.0))  # stderr is not progress
    h.proto.childDataReceived(1, _pos(10.0) + _pos(11.0))
    assert h.progress == [10.0, 25.0, 99.9]
    h.output()
    h.end(0)
    assert h.progress == [10.0, 25.0, 99.9, 100.0]


def test_output_read_after_the_exit_is_logged_not_parsed(h: Harness) -> None:
    """Status lines drained from the pipes after the encoder exited go to the log, and move no progress."""
    h.start(MENCODER, {"file": "in.mp4"})
    h.proto.childDataReceived(1, _pos(1.0))
    h.output()
    h.proto.processExited(Failure(ProcessDone(0)))
    h.proto.childDataReceived(1, _pos(5.0))
    assert h.progress == [10.0]
    h.proto.processEnded(Failure(ProcessDone(0)))
    assert h.progress == [10.0, 100.0]
    assert b"Pos:   5.0s" in (h.job_dir / "encoder.log").read_bytes()


def test_progress_byte_figure_without_duration(h: Harness) -> None:
    """When the input's duration is unknown, mencoder's own percentage is used."""
    h.answers["in.mp4"] = _info(None)
    h.start(MENCODER, {"file": "in.mp4"})
    h.proto.childDataReceived(1, _pos(1.0, percent=40))
    assert h.progress == [40.0]


def test_ffmpeg_progress(h: Harness) -> None:
    """ffmpeg's -progress blocks give progress, and progress=end stays below 100."""
    h.start(FFMPEG, {"file": "in.mp4"})
    h.proto.childDataReceived(1, b"out_time_us=N/A\nprogress=continue\n")
    h.proto.childDataReceived(1, b"out_time_us=2500000\nprogress=continue\n")
    h.proto.childDataReceived(1, b"out_time_us=10000000\nprogress=end\n")
    assert h.progress == [25.0, 99.9]


def test_no_duration_check_when_input_duration_unknown(h: Harness) -> None:
    """An input without a duration cannot be compared with, so any readable output passes."""
    h.answers["in.mp4"] = _info(None)
    h.answers["result.partial.avi"] = _info(1.0)
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    assert h.outcomes[0].state is JobState.SUCCEEDED


def test_log_and_tail(h: Harness) -> None:
    """Every byte of stdout and stderr goes to encoder.log; the tail keeps the last 20 lines."""
    h.start(MENCODER, {"file": "in.mp4"})
    chunks = [(1, b"MEncoder\n"), (2, b"warning one\n"), (1, _pos(1.0) + _pos(2.0) + b"\n")]
    chunks += [(2, b"line %d\n" % i) for i in range(30)]
    chunks += [(2, b"Cannot open demuxer.")]
    for fd, data in chunks:
        h.proto.childDataReceived(fd, data)
    h.end(1)
    log = (h.job_dir / "encoder.log").read_bytes()
    assert log == b"".join(data for _, data in chunks)
    [outcome] = h.outcomes
    assert outcome.log_tail is not None
    lines = outcome.log_tail.split("\n")
    assert len(lines) == 20
    assert lines[-1] == "Cannot open demuxer."
    assert lines[0] == "line 11"


def test_tail_shows_a_redrawn_line_once(h: Harness) -> None:
    """mencoder's status line, redrawn with carriage returns, is one line in the tail."""
    h.start(MENCODER, {"file": "in.mp4"})
    h.proto.childDataReceived(1, b"".join(_pos(i / 10) for i in range(200)))
    h.proto.childDataReceived(1, b"\nFlushing video frames.\n")
    h.end(3)
    tail = h.outcomes[0].log_tail
    assert tail is not None
    assert tail.split("\n") == [_pos(19.9).decode().strip("\r").strip(), "Flushing video frames."]


def test_log_cap(h: Harness) -> None:
    """Past the cap the log stops growing and says so, while the pipes are still read."""
    h.start(MENCODER, {"file": "in.mp4"}, log_limit=1000)
    h.proto.childDataReceived(2, b"a" * 600)
    h.proto.childDataReceived(2, b"b" * 600)
    h.proto.childDataReceived(1, _pos(5.0))
    log = (h.job_dir / "encoder.log").read_bytes()
    assert log.startswith(b"a" * 600 + b"b" * 400 + b"\n[transcoder: log truncated at 1000 bytes")
    assert b"Pos" not in log
    assert h.progress == [50.0]


def test_exit_code_failure(h: Harness) -> None:
    """A non-zero exit fails the job with the code and the encoder's last complaint."""
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.proto.childDataReceived(1, b"Exiting...\n")
    h.proto.childDataReceived(2, b"Failed to open x.\nCannot open file/device.\n")
    h.end(1)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.exit_code == 1
    assert outcome.error == "encoder exited with code 1: Cannot open file/device."
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.execution.pid is None


def test_signal_failure(h: Harness) -> None:
    """An encoder killed by a signal it was not sent fails the job, naming the signal."""
    h.start(MENCODER, {"file": "in.mp4"})
    h.end(sig=11)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "encoder killed by signal 11"
    assert h.killed == []


def test_duration_mismatch(h: Harness) -> None:
    """Exit 0 with an output much shorter than the input is a failure, and the output goes."""
    h.answers["result.partial.avi"] = _info(0.04)
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "output duration 0.04 s does not match input duration 10.00 s"
    assert not (h.job_dir / "result.partial.avi").exists()
    assert not (h.job_dir / "result.avi").exists()
    assert max(h.progress, default=0) < 100


def test_duration_within_tolerance(h: Harness) -> None:
    """An output within the profile's tolerance of the input's duration passes."""
    h.answers["result.partial.avi"] = _info(10.45)
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    assert h.outcomes[0].state is JobState.SUCCEEDED


def test_output_not_media(h: Harness) -> None:
    """Exit 0 with an output ffprobe rejects is a failure."""
    h.answers["result.partial.avi"] = NotMediaError()
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error is not None and "not a media file" in outcome.error
    assert not (h.job_dir / "result.partial.avi").exists()


def test_output_duration_from_its_header(h: Harness) -> None:
    """
    An output whose container header states its duration is checked by that
    alone: ffprobe runs for the input only, and the stated duration is the
    result's.
    """
    read: list[Path] = []

    def read_header(path: Path) -> Contents | None:
        read.append(path)
        return Contents(10.2)

    h.start(MENCODER, {"file": "in.mp4"}, read_header=read_header)
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.output is not None and outcome.output.duration == 10.2
    assert read == [h.job_dir / "result.partial.avi"]
    assert h.probed == [h.job_dir / "in.mp4"]


def test_header_duration_mismatch(h: Harness) -> None:
    """A header stating a duration far from the input's fails the job, as ffprobe's would."""
    h.start(MENCODER, {"file": "in.mp4"}, read_header=lambda path: Contents(0.04))
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "output duration 0.04 s does not match input duration 10.00 s"
    assert h.probed == [h.job_dir / "in.mp4"]
    assert not (h.job_dir / "result.partial.avi").exists()
    assert max(h.progress, default=0) < 100


def test_unread_header_falls_back_to_ffprobe(h: Harness) -> None:
    """An output whose header gives no answer is checked by ffprobe, whose verdict counts."""
    h.answers["result.partial.avi"] = _info(0.04)
    h.start(MENCODER, {"file": "in.mp4"}, read_header=lambda path: None)
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "output duration 0.04 s does not match input duration 10.00 s"
    assert h.probed == [h.job_dir / "in.mp4", h.job_dir / "result.partial.avi"]


def test_header_reader_error_falls_back_to_ffprobe(h: Harness) -> None:
    """A header reader that raises is logged, and ffprobe checks the output instead."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)

    def broken(path: Path) -> Contents | None:
        raise ValueError("unexpected")

    try:
        h.start(MENCODER, {"file": "in.mp4"}, read_header=broken)
        h.output()
        h.end(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert h.probed[-1] == h.job_dir / "result.partial.avi"
    assert any(e.get("log_format") == "reading the output's header" for e in events)


def test_garbage_is_probed_before_any_encoder_starts(h: Harness) -> None:
    """An input that does not start like a media file waits for its probe: rejected, the job fails and no encoder was ever spawned."""
    probing: Deferred[MediaInfo] = Deferred()
    h.answers.update({"in.bin": probing})
    h.start(MENCODER, {"file": "in.bin"}, sniff=lambda path: False)
    assert h.reactor.spawned == []
    probing.errback(NotMediaError())
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "not a recognised media file: file"
    assert h.reactor.spawned == []
    assert h.killed == []


def test_unrecognised_start_that_probes_as_media_then_encodes(h: Harness) -> None:
    """An input whose first bytes are not a known container but which ffprobe accepts is encoded once the probe has answered, with the probe's duration for progress."""
    probing: Deferred[MediaInfo] = Deferred()
    h.answers.update({"in.bin": probing, "result.partial.avi": _info(10.0)})
    h.start(MENCODER, {"file": "in.bin"}, sniff=lambda path: False)
    assert h.reactor.spawned == []
    probing.callback(_info(10.0, "video", "audio"))
    assert h.spawns == [90000]
    h.proto.childDataReceived(1, _pos(5.0))
    assert h.progress and 49 <= h.progress[-1] <= 51
    h.output()
    h.end()
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED


def test_cancel_while_the_early_probe_runs(h: Harness) -> None:
    """Cancelled while an unrecognised input is being probed: cancelled, and no encoder is spawned."""
    probing: Deferred[MediaInfo] = Deferred()
    h.answers.update({"in.bin": probing})
    execution = h.start(MENCODER, {"file": "in.bin"}, sniff=lambda path: False)
    execution.cancel()
    [outcome] = h.outcomes
    assert outcome.state is JobState.CANCELLED
    assert h.reactor.spawned == []


def test_looks_like_media_by_first_bytes(tmp_path: Path, clips) -> None:  # type: ignore[no-untyped-def]
    """Real FLV, MP4 and MP3 files look like media by their first bytes; random-looking bytes, an empty file and a missing one do not."""
    assert looks_like_media(clips.flv_video)
    assert looks_like_media(clips.av)
    assert looks_like_media(clips.mp3_audio)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(1, 64)) * 100)
    assert not looks_like_media(junk)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert not looks_like_media(empty)
    assert not looks_like_media(tmp_path / "missing")


def test_input_not_media(h: Harness) -> None:
    """
    An input ffprobe rejects KILLs the encoder started beside the probes, and
    the job fails naming the input's role, with nothing of that encoder kept.
    """
    h.answers.update({"v.flv": _info(3.0), "a.bin": NotMediaError()})
    h.start(MUX, {"video": "v.flv", "audio": "a.bin"})
    assert h.spawns == [90000]
    assert h.killed == [(90000, signal.SIGKILL)]
    # Not settled until the encoder has really ended: it could still write.
    assert h.outcomes == []
    h.proto.childDataReceived(2, b"VDecoder init failed\n")
    h.output()
    h.end(sig=9)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "not a recognised media file: audio"
    assert outcome.exit_code is None and outcome.log_tail is None
    assert sorted(p.name for p in h.job_dir.iterdir()) == []
    assert h.execution.pid is None
    assert h.reactor.getDelayedCalls() == []


def test_input_rejected_after_the_encoder_succeeded(h: Harness) -> None:
    """
    An encoder quicker than the input probe, exiting 0, proves nothing: the
    job waits for the probe, and a rejected input fails it with no result.
    """
    pending: Deferred[MediaInfo] = Deferred()
    h.answers["in.mp4"] = pending
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    assert h.outcomes == []
    assert h.probed == [h.job_dir / "in.mp4"]
    pending.errback(NotMediaError())
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "not a recognised media file: file"
    assert h.killed == []
    assert h.probed == [h.job_dir / "in.mp4"]
    assert sorted(p.name for p in h.job_dir.iterdir()) == []
    assert h.progress == []


def test_input_accepted_after_the_encoder_ended(h: Harness) -> None:
    """An encoder that ends before the input probe answers succeeds once the probe passes it."""
    pending: Deferred[MediaInfo] = Deferred()
    h.answers["in.mp4"] = pending
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    assert h.outcomes == []
    pending.callback(_info(10.0))
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert h.probed == [h.job_dir / "in.mp4", h.job_dir / "result.partial.avi"]
    assert (h.job_dir / "result.avi").exists()


def test_output_hashed_while_the_input_probes_finish(h: Harness) -> None:
    """
    The output of an encoder that exits 0 is hashed at once, while the input
    probes still run; the digest is the result's once they pass it.
    """
    pending: Deferred[MediaInfo] = Deferred()
    h.answers["in.mp4"] = pending
    hashing = HeldHash()
    h.start(MENCODER, {"file": "in.mp4"}, hash_file=hashing)
    h.output()
    h.end(0)
    assert hashing.paths == [h.job_dir / "result.partial.avi"]
    assert h.outcomes == []
    hashing.digest.callback("ab" * 32)
    assert h.outcomes == []
    pending.callback(_info(10.0))
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.output is not None and outcome.output.sha256 == "ab" * 32


def test_hash_starts_at_the_exit_before_the_pipes_are_drained(h: Harness) -> None:
    """
    The output is hashed from the encoder's exit (processExited), while its
    last output is still read from the pipes; the outcome waits for both, and
    keeps the lines read after the exit in the log tail.
    """
    h.answers["in.mp4"] = _info(10.0)
    hashing = HeldHash()
    h.start(MENCODER, {"file": "in.mp4"}, hash_file=hashing)
    h.output()
    h.proto.processExited(Failure(ProcessDone(0)))
    assert hashing.paths == [h.job_dir / "result.partial.avi"]
    hashing.digest.callback("cd" * 32)
    assert h.outcomes == []
    h.proto.childDataReceived(2, b"last words\n")
    h.proto.processEnded(Failure(ProcessDone(0)))
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.output is not None and outcome.output.sha256 == "cd" * 32
    assert outcome.log_tail is not None and "last words" in outcome.log_tail


def test_output_changed_after_the_exit_is_hashed_again(h: Harness) -> None:
    """
    An output that changed between the encoder's exit and its pipes' end (a
    child of the encoder still writing it) is hashed again, and the result's
    digest is the second one, of the final bytes.
    """
    h.answers["in.mp4"] = _info(10.0)
    hashes: list[Deferred[str]] = []

    def hash_file(path: Path) -> Deferred[str]:
        hashes.append(Deferred())
        return hashes[-1]

    h.start(MENCODER, {"file": "in.mp4"}, hash_file=hash_file)
    h.output(b"first part")
    h.proto.processExited(Failure(ProcessDone(0)))
    assert len(hashes) == 1
    with (h.job_dir / "result.partial.avi").open("ab") as f:
        f.write(b", and the rest")
    h.proto.processEnded(Failure(ProcessDone(0)))
    assert len(hashes) == 2
    assert hashes[0].called  # cancelled; its CancelledError is handled
    hashes[1].callback("ef" * 32)
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED
    assert outcome.output is not None and outcome.output.sha256 == "ef" * 32
    assert (h.job_dir / "result.avi").read_bytes() == b"first part, and the rest"


def test_no_hash_at_an_exit_that_failed(h: Harness) -> None:
    """An encoder that exits non-zero has its output never hashed, and the job fails with the code."""
    h.answers["in.mp4"] = _info(10.0)
    hashed: list[Path] = []
    h.start(MENCODER, {"file": "in.mp4"}, hash_file=lambda p: hashed.append(p) or succeed("0"))
    h.output()
    failed = Failure(ProcessTerminated(exitCode=1))
    h.proto.processExited(failed)
    h.proto.processEnded(failed)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.exit_code == 1
    assert hashed == []


@pytest.mark.parametrize("exit_code", [0, 1])
def test_hash_dropped_when_an_input_is_rejected(h: Harness, exit_code: int) -> None:
    """
    A digest under way when the input probe rejects its input is cancelled
    and unused; an encoder that failed has its output never hashed.
    """
    pending: Deferred[MediaInfo] = Deferred()
    h.answers["in.mp4"] = pending
    hashes: list[Deferred[str]] = []

    def hash_file(path: Path) -> Deferred[str]:
        hashes.append(Deferred())
        return hashes[-1]

    h.start(MENCODER, {"file": "in.mp4"}, hash_file=hash_file)
    h.output()
    h.end(exit_code)
    pending.errback(NotMediaError())
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "not a recognised media file: file"
    assert outcome.output is None
    assert len(hashes) == (1 if exit_code == 0 else 0)
    for d in hashes:
        assert d.called  # cancelled; its CancelledError is handled
    assert not (h.job_dir / "result.partial.avi").exists()


def test_probe_error_stops_the_encoder(h: Harness) -> None:
    """An input that cannot be probed at all (no ffprobe) also stops the encoder and fails."""
    h.answers["in.mp4"] = FileNotFoundError("ffprobe is not installed (not on PATH)")
    h.start(MENCODER, {"file": "in.mp4"})
    assert h.killed == [(90000, signal.SIGKILL)]
    h.end(sig=9)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "could not probe input file: ffprobe is not installed (not on PATH)"


def test_kill_before_setsid_reaches_the_child(h: Harness) -> None:
    """
    A stop so soon after the spawn that the child has no process group yet
    signals the child itself, through its transport.
    """
    h.no_group.add(90000)
    h.answers["in.mp4"] = NotMediaError()
    h.start(MENCODER, {"file": "in.mp4"})
    assert h.killed == []
    assert h.proto.transport.signals == [signal.SIGKILL]  # type: ignore[union-attr]
    h.end(sig=9)
    assert h.outcomes[0].error == "not a recognised media file: file"


def test_progress_waits_for_the_duration(h: Harness) -> None:
    """
    Until the input probe answers, status lines report nothing (mencoder's
    byte figure would start high and hold the bar up); then progress is the
    position over the duration, and never goes back.
    """
    pending: Deferred[MediaInfo] = Deferred()
    h.answers["in.mp4"] = pending
    h.start(MENCODER, {"file": "in.mp4"})
    h.proto.childDataReceived(1, _pos(0.5, percent=17) + _pos(1.0, percent=18))
    assert h.progress == []
    pending.callback(_info(10.0))
    h.proto.childDataReceived(1, _pos(1.5, percent=19))
    h.proto.childDataReceived(1, _pos(3.0, percent=20))
    assert h.progress == [15.0, 30.0]


def test_duration_from_first_input(h: Harness) -> None:
    """Progress and the duration check use the profile's first input, not the longest."""
    h.answers.update({"v.flv": _info(4.0), "a.mp3": _info(40.0, "audio")})
    h.answers["result.partial.avi"] = _info(4.05)
    h.start(MUX, {"video": "v.flv", "audio": "a.mp3"})
    h.proto.childDataReceived(1, _pos(1.0))
    assert h.progress == [25.0]
    h.output()
    h.end(0)
    assert h.outcomes[0].state is JobState.SUCCEEDED


def test_stale_partial_removed_before_start(h: Harness) -> None:
    """A partial output left by an earlier attempt is gone before the encoder starts."""
    h.output(b"old")
    h.start(MENCODER, {"file": "in.mp4"})
    assert not (h.job_dir / "result.partial.avi").exists()


def test_encoder_not_installed(h: Harness) -> None:
    """A profile naming a program not on PATH fails without spawning."""
    missing = Profile(
        name="missing",
        description="",
        executable="no-such-encoder-9f2c",
        argv=("{file}", "{output}"),
    )
    h.start(missing, {"file": "in.mp4"})
    assert h.outcomes[0].state is JobState.FAILED
    assert h.outcomes[0].error == "encoder not found: no-such-encoder-9f2c"
    assert h.reactor.spawned == []


def test_time_limit_term_then_kill(h: Harness) -> None:
    """At the time limit the group gets TERM, then KILL after the grace; the job times out."""
    h.start(MENCODER, {"file": "in.mp4"}, timeout=10, kill_grace=5)
    h.output()
    h.reactor.advance(9.99)
    assert h.killed == []
    h.reactor.advance(0.01)
    assert h.killed == [(90000, signal.SIGTERM)]
    h.reactor.advance(4.99)
    assert h.killed == [(90000, signal.SIGTERM)]
    h.reactor.advance(0.01)
    assert h.killed == [(90000, signal.SIGTERM), (90000, signal.SIGKILL)]
    assert h.outcomes == []
    assert h.execution.pid == 90000
    h.end(sig=9)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "timed out after 10 s"
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.execution.pid is None
    assert h.reactor.getDelayedCalls() == []


def test_time_limit_no_kill_when_term_suffices(h: Harness) -> None:
    """An encoder that exits on TERM gets no KILL, even one that exits 0."""
    h.start(MENCODER, {"file": "in.mp4"}, timeout=3, kill_grace=5)
    h.reactor.advance(3)
    h.output()
    h.end(0)
    assert h.outcomes[0].state is JobState.FAILED
    assert h.outcomes[0].error == "timed out after 3 s"
    assert h.reactor.getDelayedCalls() == []
    h.reactor.advance(10)
    assert h.killed == [(90000, signal.SIGTERM)]
    assert not (h.job_dir / "result.partial.avi").exists()


def test_no_time_limit(h: Harness) -> None:
    """With no time limit nothing is scheduled but the look at the free space, and nothing is killed."""
    h.start(MENCODER, {"file": "in.mp4"}, timeout=None)
    [watch] = h.reactor.getDelayedCalls()
    assert watch.getTime() == DISK_WATCH
    h.reactor.advance(100000)
    assert h.killed == []


def test_cancel_running(h: Harness) -> None:
    """cancel() TERMs the group at once; mencoder's exit 2 with a valid partial is CANCELLED."""
    h.start(MENCODER, {"file": "in.mp4"}, kill_grace=5)
    h.proto.childDataReceived(1, _pos(4.0))
    h.execution.cancel()
    h.execution.cancel()
    assert h.killed == [(90000, signal.SIGTERM)]
    h.output()
    h.end(2)
    [outcome] = h.outcomes
    assert outcome.state is JobState.CANCELLED
    assert outcome.exit_code == 2
    assert outcome.error is None
    assert not (h.job_dir / "result.partial.avi").exists()
    assert not (h.job_dir / "result.avi").exists()
    h.reactor.advance(10)
    assert h.killed == [(90000, signal.SIGTERM)]
    assert h.progress == [40.0]


def test_cancel_kill_after_grace(h: Harness) -> None:
    """An encoder ignoring TERM gets KILL after the grace, and the outcome is still CANCELLED."""
    h.start(MENCODER, {"file": "in.mp4"}, kill_grace=2)
    h.execution.cancel()
    h.reactor.advance(2)
    assert h.killed == [(90000, signal.SIGTERM), (90000, signal.SIGKILL)]
    h.end(sig=9)
    assert h.outcomes[0].state is JobState.CANCELLED


def test_cancel_during_probe(h: Harness) -> None:
    """
    cancel() while an input is still probed TERMs the encoder beside it and
    stops the probe; the job ends CANCELLED once the encoder has ended.
    """
    pending: Deferred[MediaInfo] = Deferred()
    stopped: list[Failure] = []
    pending.addErrback(stopped.append)
    h.answers["in.mp4"] = pending
    h.start(MENCODER, {"file": "in.mp4"})
    h.execution.cancel()
    assert h.killed == [(90000, signal.SIGTERM)]
    assert h.outcomes == []
    h.output()
    h.end(2)
    [outcome] = h.outcomes
    assert outcome.state is JobState.CANCELLED
    assert [f.type for f in stopped] == [CancelledError]
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.execution.pid is None


def test_time_limit_during_probe(h: Harness) -> None:
    """
    The time limit covers probing: an input probe still running after the
    encoder ended is stopped, and the job fails as timed out.
    """
    pending: Deferred[MediaInfo] = Deferred()
    h.answers["in.mp4"] = pending
    h.start(MENCODER, {"file": "in.mp4"}, timeout=30)
    h.output()
    h.end(0)
    h.reactor.advance(30)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "timed out after 30 s"
    assert h.killed == []
    assert pending.called
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.reactor.getDelayedCalls() == []


def test_cancel_while_checking_output(h: Harness) -> None:
    """cancel() while the output is being probed ends CANCELLED and removes the output."""
    h.answers["result.partial.avi"] = Deferred()
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    assert h.outcomes == []
    h.execution.cancel()
    assert h.outcomes[0].state is JobState.CANCELLED
    assert h.killed == []
    assert not (h.job_dir / "result.partial.avi").exists()


def test_cancel_after_end_is_harmless(h: Harness) -> None:
    """cancel() after the outcome changes nothing and signals nobody."""
    h.start(MENCODER, {"file": "in.mp4"})
    h.output()
    h.end(0)
    h.execution.cancel()
    assert [o.state for o in h.outcomes] == [JobState.SUCCEEDED]
    assert h.killed == []
    assert (h.job_dir / "result.avi").exists()


def test_broken_callbacks_do_not_break_the_job(h: Harness) -> None:
    """on_spawn and on_progress raising is logged, and the job still succeeds."""

    def boom(_: object) -> None:
        raise RuntimeError("boom")

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        execution = execute_job(
            h.reactor,
            job_dir=h.job_dir,
            profile=MENCODER,
            inputs={"file": h.job_dir / "in.mp4"},
            params={"vbitrate": 900},
            timeout=None,
            on_progress=boom,
            on_spawn=boom,
            probe=h.probe,
            count=h.probe,
            killpg=h.killpg,
            hash_file=lambda p: succeed("0" * 64),
            sniff=lambda path: True,
        )
        outcomes: list[Outcome] = []
        execution.deferred.addCallback(outcomes.append)
        h.reactor.advance(0)
        h.reactor.spawned[-1]["proto"].childDataReceived(1, _pos(3.0))
        h.output()
        h.reactor.spawned[-1]["proto"].processEnded(Failure(ProcessDone(0)))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcomes[0].state is JobState.SUCCEEDED
    logged = [e["log_failure"].value for e in events if "log_failure" in e]
    # on_spawn once, on_progress for 30% and for the final 100%.
    assert [str(v) for v in logged] == ["boom", "boom", "boom"]


def test_internal_error_is_an_outcome(h: Harness) -> None:
    """An unexpected error after the encoder ended gives a FAILED outcome, never an errback."""
    errors: list[Failure] = []
    h.start(
        MENCODER,
        {"file": "in.mp4"},
        hash_file=lambda p: fail(RuntimeError("disk on fire")),
    )
    h.execution.deferred.addErrback(errors.append)
    h.output()
    h.end(0)
    assert errors == []
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "internal error: disk on fire"
    assert not (h.job_dir / "result.partial.avi").exists()


def test_progress_callback_type(h: Harness) -> None:
    """Progress values are floats in 0..100, whatever the encoder prints."""
    h.start(MENCODER, {"file": "in.mp4"})

    def noise(i: int) -> bytes:
        return bytes((i * 37 + k) % 256 for k in range(300))

    for i in range(50):
        h.proto.childDataReceived(1, noise(i) + _pos(i / 5))
    assert all(isinstance(p, float) and 0 <= p < 100 for p in h.progress)
    assert h.progress == sorted(h.progress)


# A full disk (issue 14)


@dataclass
class Disk:
    """A fake output filesystem: the bytes free, and how often it was looked at."""

    free: int = 10 * 1024 * 1024
    looks: int = 0

    def __call__(self, path: Path) -> int:
        self.looks += 1
        return self.free


def test_disk_filling_while_the_encoder_runs(h: Harness) -> None:
    """Free space falling below the reserve while the encoder runs: its group is TERMed and the job fails saying the disk is full, with the bytes free, its partial output removed."""
    disk = Disk()
    h.start(MENCODER, {"file": "in.mp4"}, disk_free=disk, disk_reserve=1024 * 1024)
    h.reactor.advance(DISK_WATCH)
    assert disk.looks == 1 and h.killed == []
    disk.free = 4096
    h.reactor.advance(DISK_WATCH)
    assert h.killed == [(90000, signal.SIGTERM)]
    h.output()
    h.end(2)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "the data disk is full (4096 bytes free); output discarded"
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.reactor.getDelayedCalls() == []


def test_disk_full_at_exit_fails_an_exit_0(h: Harness) -> None:
    """An encoder that exits 0 with its filesystem below the reserve (mencoder does, on ENOSPC) fails as the disk being full; its output is neither checked nor kept."""
    disk = Disk()
    read: list[Path] = []
    h.start(
        MENCODER,
        {"file": "in.mp4"},
        disk_free=disk,
        read_header=lambda path: read.append(path) or Contents(10.0),
    )
    h.output()
    disk.free = 0
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == "the data disk is full (0 bytes free); output discarded"
    assert read == []
    assert not (h.job_dir / "result.partial.avi").exists()
    assert not (h.job_dir / "result.avi").exists()


def test_no_space_left_on_device_in_the_encoders_output(h: Harness) -> None:
    """An encoder that said "No space left on device" fails the job as the disk being full even with its exit 0 and the space back."""
    h.start(FFMPEG, {"file": "in.mp4"}, disk_free=Disk())
    h.proto.childDataReceived(2, b"av_interleaved_write_frame(): No space left on device\n")
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == (
        "the data disk is full (10485760 bytes free); output discarded: "
        "av_interleaved_write_frame(): No space left on device"
    )
    assert not (h.job_dir / "result.partial.avi").exists()


def test_output_short_of_its_header(h: Harness) -> None:
    """An output whose header states the input's 30 s but whose index holds 292 of its 750 frames fails, saying so."""
    h.answers["in.mp4"] = _info(30.0)
    held = Contents(30.0, (Held("video", 750, 292, 30.0, 11.68),))
    h.start(MENCODER, {"file": "in.mp4"}, read_header=lambda path: held)
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error == (
        "the output holds 292 of the 750 video frames its header states (11.68 of 30.00 s)"
    )
    assert not (h.job_dir / "result.partial.avi").exists()


def test_output_short_of_its_header_by_ffprobe_count(h: Harness) -> None:
    """With no in-process reading, ffprobe's packet count decides: 292 packets of 750 stated frames fail the job."""
    h.answers["in.mp4"] = _info(30.0)
    h.answers["result.partial.avi"] = MediaInfo(
        30.0,
        "avi",
        (StreamInfo("video", "mpeg4", duration=30.0, frames=750, frame_rate=25.0, packets=292),),
    )
    h.start(MENCODER, {"file": "in.mp4"}, read_header=lambda path: None)
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith("the output holds 292 of the 750 video frames")
    assert h.probed[-1] == h.job_dir / "result.partial.avi"


def test_output_within_tolerance_of_its_header(h: Harness) -> None:
    """A frame or two short of the header (within the profile's tolerance) is accepted."""
    held = Contents(10.0, (Held("video", 250, 249, 10.0, 9.96),))
    h.start(MENCODER, {"file": "in.mp4"}, read_header=lambda path: held)
    h.output()
    h.end(0)
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED

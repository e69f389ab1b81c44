"""
execute_job with the real reactor, the real encoders and the built-in
profiles, on clips generated at test time.  Few and short: the logic is
covered by test_runner with a fake reactor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import deferLater

from transcoder.core.jobs import JobState
from transcoder.core.profiles import ParamValue, Profile, builtin_profiles
from transcoder.engine.outcome import Outcome
from transcoder.engine.probe import MediaInfo
from transcoder.engine.probe import probe as ffprobe
from transcoder.engine.runner import IJobExecution, execute_job

if TYPE_CHECKING:
    from conftest import Clips

PROFILES = builtin_profiles()
FfprobeJson = Callable[[Path], dict[str, Any]]


@dataclass
class Run:
    execution: IJobExecution
    progress: list[float] = field(default_factory=list)
    spawned: list[int] = field(default_factory=list)
    # Every file ffprobe was run on.
    probed: list[Path] = field(default_factory=list)


def _start(
    job_dir: Path,
    profile: Profile,
    inputs: Mapping[str, Path],
    params: Mapping[str, ParamValue] | None = None,
    timeout: float | None = 60,
    kill_grace: float = 5.0,
) -> Run:
    job_dir.mkdir(exist_ok=True)
    progress: list[float] = []
    spawned: list[int] = []
    probed: list[Path] = []

    def recording_probe(reactor: IReactorProcess, path: Path) -> Deferred[MediaInfo]:
        probed.append(path)
        return ffprobe(reactor, path)

    execution = execute_job(
        reactor,
        job_dir=job_dir,
        profile=profile,
        inputs=inputs,
        params={n: p.default for n, p in profile.parameters.items()} | dict(params or {}),
        timeout=timeout,
        on_progress=progress.append,
        on_spawn=spawned.append,
        kill_grace=kill_grace,
        probe=recording_probe,
    )
    return Run(execution, progress, spawned, probed)


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await _sleep(0.02)


def _live_members(pgid: int) -> list[int]:
    """
    The processes of a group that are not zombies.  This machine's init does
    not reap orphans, so the zombie of a killed grandchild can linger in the
    group although nothing runs any more.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _assert_group_gone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def _streams(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in doc["streams"] if s["codec_type"] == kind]


def _assert_progress_reported(progress: list[float]) -> None:
    assert progress, "no progress reported"
    assert progress == sorted(progress)
    assert progress[-1] == 100.0
    assert all(0 <= p < 100 for p in progress[:-1])


@pytest_twisted.ensureDeferred
async def test_avi_mpeg4(clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson) -> None:
    """avi-mpeg4 turns the clip into MPEG-4 and MP3 in AVI, every frame kept."""
    run = _start(tmp_path / "job", PROFILES["avi-mpeg4"], {"file": clips.av})
    outcome = await run.execution.deferred
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert outcome.output is not None and outcome.output.path == "result.avi"
    result = tmp_path / "job" / "result.avi"
    doc = ffprobe_json(result)
    assert doc["format"]["format_name"] == "avi"
    [video] = _streams(doc, "video")
    [audio] = _streams(doc, "audio")
    assert video["codec_name"] == "mpeg4" and audio["codec_name"] == "mp3"
    assert abs(float(doc["format"]["duration"]) - 3.0) <= 0.15
    # A frozen picture (one frame repeated) would pass a duration check.
    assert int(video["nb_read_frames"]) >= 72
    assert outcome.output.size == result.stat().st_size
    assert outcome.output.media_type == "video/x-msvideo"
    assert not (tmp_path / "job" / "result.partial.avi").exists()
    assert (tmp_path / "job" / "encoder.log").read_bytes().startswith(b"MEncoder")
    _assert_progress_reported(run.progress)
    # The output's duration came from its header: ffprobe ran for the input alone.
    assert run.probed == [clips.av]
    assert outcome.output.duration == pytest.approx(float(doc["format"]["duration"]), abs=2e-6)
    assert len(run.spawned) == 1 and run.execution.pid is None
    _assert_group_gone(run.spawned[0])


@pytest_twisted.ensureDeferred
async def test_mp4_h264(clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson) -> None:
    """mp4-h264 gives H.264 and AAC in an MP4 whose moov atom comes first."""
    run = _start(tmp_path / "job", PROFILES["mp4-h264"], {"file": clips.av}, {"crf": 30})
    outcome = await run.execution.deferred
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    result = tmp_path / "job" / "result.mp4"
    doc = ffprobe_json(result)
    assert "mp4" in doc["format"]["format_name"].split(",")
    [video] = _streams(doc, "video")
    [audio] = _streams(doc, "audio")
    assert video["codec_name"] == "h264" and audio["codec_name"] == "aac"
    assert int(video["nb_read_frames"]) >= 72
    assert abs(float(doc["format"]["duration"]) - 3.0) <= 0.15
    head = result.read_bytes()
    assert 0 <= head.find(b"moov") < head.find(b"mdat")
    assert outcome.output is not None and outcome.output.media_type == "video/mp4"
    _assert_progress_reported(run.progress)
    assert run.probed == [clips.av]
    assert outcome.output.duration == pytest.approx(float(doc["format"]["duration"]), abs=2e-6)


@pytest_twisted.ensureDeferred
async def test_mux_avi(clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson) -> None:
    """mux-avi copies the FLV video and the MP3 audio into one AVI."""
    run = _start(
        tmp_path / "job",
        PROFILES["mux-avi"],
        {"video": clips.flv_video, "audio": clips.mp3_audio},
    )
    outcome = await run.execution.deferred
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    doc = ffprobe_json(tmp_path / "job" / "result.avi")
    assert doc["format"]["format_name"] == "avi"
    [video] = _streams(doc, "video")
    [audio] = _streams(doc, "audio")
    assert video["codec_name"] == "flv1" and audio["codec_name"] == "mp3"
    assert int(video["nb_read_frames"]) == 75
    assert abs(float(doc["format"]["duration"]) - 3.0) <= 0.15
    _assert_progress_reported(run.progress)
    assert sorted(run.probed) == sorted([clips.flv_video, clips.mp3_audio])
    assert outcome.output is not None
    assert outcome.output.duration == pytest.approx(float(doc["format"]["duration"]), abs=2e-6)


@pytest_twisted.ensureDeferred
async def test_noise_is_not_media(clips: Clips, tmp_path: Path) -> None:
    """
    Random bytes fail as not media, probed before any encoder starts (they
    begin like no container), and nothing is left in the job directory.
    """
    run = _start(tmp_path / "job", PROFILES["avi-mpeg4"], {"file": clips.noise})
    outcome = await run.execution.deferred
    assert outcome.state is JobState.FAILED
    assert outcome.error == "not a recognised media file: file"
    assert outcome.log_tail is None
    assert run.spawned == []
    assert list((tmp_path / "job").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_noise_dressed_as_flv_stops_its_encoder(clips: Clips, tmp_path: Path) -> None:
    """
    Random bytes behind an FLV signature start their encoder beside the probe;
    ffprobe rejects them, the encoder's whole group is stopped, and neither
    output nor log of it is left.
    """
    fake = tmp_path / "fake.flv"
    fake.write_bytes(b"FLV\x01\x05" + clips.noise.read_bytes())
    run = _start(tmp_path / "job", PROFILES["avi-mpeg4"], {"file": fake})
    outcome = await run.execution.deferred
    assert outcome.state is JobState.FAILED
    assert outcome.error == "not a recognised media file: file"
    assert outcome.log_tail is None
    [pid] = run.spawned
    assert run.execution.pid is None
    _assert_group_gone(pid)
    assert list((tmp_path / "job").iterdir()) == []


# ffmpeg reading at the input's own rate (-re) takes the clip's 12 s to
# finish, with almost no CPU, so a short time limit always catches it running.
REALTIME_FFMPEG = replace(
    PROFILES["mp4-h264"],
    name="realtime-mp4",
    argv=("-re", *PROFILES["mp4-h264"].argv),
)
# x264 at its slowest on an upscaled picture: mencoder needs many seconds for
# the long clip, so it is still encoding when cancelled.
SLOW_MENCODER = replace(
    PROFILES["avi-mpeg4"],
    name="slow-avi",
    argv=(
        "{file}",
        *("-noskip", "-mc", "0", "-vf", "scale=1280:960"),
        *("-ovc", "x264", "-x264encopts", "preset=veryslow:threads=1"),
        *("-oac", "mp3lame", "-o", "{output}"),
    ),
    parameters={},
)


@pytest_twisted.ensureDeferred
async def test_time_limit(clips: Clips, tmp_path: Path) -> None:
    """An encoder still running at the time limit is stopped; the job fails as timed out."""
    run = _start(tmp_path / "job", REALTIME_FFMPEG, {"file": clips.av_long}, timeout=1.5)
    outcome = await run.execution.deferred
    assert outcome.state is JobState.FAILED
    assert outcome.error == "timed out after 1.5 s"
    # ffmpeg's answer to TERM.
    assert outcome.exit_code == 255
    [pid] = run.spawned
    assert run.execution.pid is None
    _assert_group_gone(pid)
    assert not (tmp_path / "job" / "result.partial.mp4").exists()
    assert not (tmp_path / "job" / "result.mp4").exists()
    assert all(p < 100 for p in run.progress)


@pytest_twisted.ensureDeferred
async def test_cancel_mencoder(clips: Clips, tmp_path: Path) -> None:
    """
    Cancelling a running mencoder stops its whole process group; its truncated
    but valid AVI does not count, and is removed.
    """
    job = tmp_path / "job"
    run = _start(job, SLOW_MENCODER, {"file": clips.av_long})
    await _until(lambda: bool(run.spawned))
    [pid] = run.spawned
    # setsid execs mencoder in place: the pid is mencoder's, and it leads its
    # own session and process group.
    await _until(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "mencoder")
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) == pid
    assert run.execution.pid == pid
    await _until(lambda: (job / "result.partial.avi").exists())
    run.execution.cancel()
    outcome = await run.execution.deferred
    assert outcome.state is JobState.CANCELLED
    # mencoder's answer to TERM.
    assert outcome.exit_code == 2
    assert run.execution.pid is None
    _assert_group_gone(pid)
    assert not (job / "result.partial.avi").exists()
    assert not (job / "result.avi").exists()
    assert all(p < 100 for p in run.progress)


@pytest_twisted.ensureDeferred
async def test_kill_after_grace(clips: Clips, tmp_path: Path) -> None:
    """A group that ignores TERM, child included, is KILLed after the grace."""
    stubborn = Profile(
        name="stubborn",
        description="",
        executable="sh",
        argv=("-c", 'trap "" TERM; echo ready; sleep 30; : "$0" "$1"', "{file}", "{output}"),
        output_extension="avi",
    )
    run = _start(tmp_path / "job", stubborn, {"file": clips.av}, kill_grace=1.0)
    log = tmp_path / "job" / "encoder.log"
    await _until(lambda: log.exists() and b"ready" in log.read_bytes())
    [pid] = run.spawned
    await _until(lambda: len(_live_members(pid)) == 2)  # sh and its sleep
    cancelled_at = time.monotonic()
    run.execution.cancel()
    await _sleep(0.2)
    assert len(_live_members(pid)) == 2
    outcome = await run.execution.deferred
    assert time.monotonic() - cancelled_at >= 1.0
    assert outcome.state is JobState.CANCELLED
    assert _live_members(pid) == []


@pytest_twisted.ensureDeferred
async def test_failure_reports_the_encoder_complaint(clips: Clips, tmp_path: Path) -> None:
    """An encoder that rejects its arguments fails with its exit code and last words."""
    broken = replace(
        PROFILES["avi-mpeg4"],
        name="broken",
        argv=("{file}", "-ovc", "no-such-codec", "-oac", "copy", "-o", "{output}"),
        parameters={},
    )
    run = _start(tmp_path / "job", broken, {"file": clips.av})
    outcome: Outcome = await run.execution.deferred
    assert outcome.state is JobState.FAILED
    assert outcome.exit_code == 1
    assert outcome.error is not None
    assert outcome.error.startswith("encoder exited with code 1: ")
    assert outcome.log_tail is not None
    assert outcome.error.split(": ", 1)[1] in outcome.log_tail.split("\n")
    assert not (tmp_path / "job" / "result.partial.avi").exists()


@pytest_twisted.ensureDeferred
async def test_short_output_fails(clips: Clips, tmp_path: Path) -> None:
    """An encoder that exits 0 with an output much shorter than its input has failed."""
    truncating = replace(
        PROFILES["mux-avi"],
        name="truncating",
        argv=(*PROFILES["mux-avi"].argv[:-2], "-endpos", "1", "-o", "{output}"),
    )
    run = _start(tmp_path / "job", truncating, {"video": clips.flv_video, "audio": clips.mp3_audio})
    outcome = await run.execution.deferred
    assert outcome.state is JobState.FAILED
    assert outcome.exit_code == 0
    assert outcome.error is not None
    assert outcome.error.startswith("output duration 1.")
    assert outcome.error.endswith("does not match input duration 3.00 s")
    assert not (tmp_path / "job" / "result.partial.avi").exists()
    assert not (tmp_path / "job" / "result.avi").exists()
    assert all(p < 100 for p in run.progress)
    # Told by the output's header, without ffprobe.
    assert sorted(run.probed) == sorted([clips.flv_video, clips.mp3_audio])

"""
Inputs that claim hours (issue 14, finding 3): a 30 KB file of 26 frames, the
last stamped at 10 h, held an encoder for minutes.  Now the built-in ffmpeg
profile keeps variable frame rate, --max-input-duration refuses long inputs at
the probe, and an ffmpeg encode that outgrows its input is stopped
(transcoder.engine.runaway).  Unit tests drive the runner through a fake reactor;
the end-to-end ones send real such files to a real server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ffmpeg
from serverproc import ServerProcess
from test_runner import FFMPEG, Harness, _info

from transcoder.core.jobs import JobState
from transcoder.core.profiles import builtin_profiles
from transcoder.engine.progress import FfmpegBlock, FfmpegProgress
from transcoder.engine.runaway import DUP_FLOOR, DUP_RATIO, clock, runaway, too_long
from transcoder.service import Options

LIMIT_MESSAGE = (
    "input file is 10:00:00 long; this server takes at most 4:00:00 (--max-input-duration)"
)


def _block(
    out_time_us: int | str = "N/A",
    frame: int = 0,
    dup: int = 0,
    drop: int = 0,
    progress: str = "continue",
) -> bytes:
    """One ffmpeg -progress block, as ffmpeg 5.1 prints it."""
    return (
        f"frame={frame}\nfps=0.00\nstream_0_0_q=-1.0\nbitrate=N/A\ntotal_size=48\n"
        f"out_time_us={out_time_us}\nout_time_ms={out_time_us}\nout_time=N/A\n"
        f"dup_frames={dup}\ndrop_frames={drop}\nspeed=N/A\nprogress={progress}\n"
    ).encode()


# The rule itself


def test_clock_shows_whole_seconds() -> None:
    """Durations are shown as h:mm:ss, rounded down."""
    assert clock(36000.04) == "10:00:00"
    assert clock(14400) == "4:00:00"
    assert clock(3599.9) == "0:59:59"


def test_too_long_names_the_input_and_the_option() -> None:
    """An input over the limit gets the message naming its length, the limit and the option; at or under it, or unknown, none."""
    assert too_long("file", 36000.04, 14400) == LIMIT_MESSAGE
    assert too_long("file", 14400, 14400) is None
    assert too_long("file", None, 14400) is None
    assert too_long("file", 36000.04, None) is None
    # A fraction over: shown as such, not as "4:00:00 long; at most 4:00:00".
    assert too_long("video", 14400.5, 14400) == (
        "input video is 14400.50 s long; this server takes at most 4:00:00 (--max-input-duration)"
    )


def test_runaway_past_the_input_duration() -> None:
    """An output position past the input's duration by twice the tolerance plus 10 s is a runaway; just under it, or with no duration, is not."""
    edge = 100 * (1 + 2 * 0.05) + 10
    assert runaway(FfmpegBlock(edge, 10, 0, 0), 100.0, 0.05) is None
    why = runaway(FfmpegBlock(edge + 1, 10, 0, 0), 100.0, 0.05)
    assert why == "stopped: the output reached 121 s, far past the input's 100.00 s"
    assert runaway(FfmpegBlock(1e6, 10, 0, 0), None, 0.05) is None


def test_runaway_by_repeated_frames() -> None:
    """Repeats beyond both the floor and the ratio per frame read are a runaway; a constant-rate conversion's few repeats per frame, or many repeats under the floor, are not."""
    # 10 fps to 25 fps for an hour: 1.5 repeats per frame read.
    assert runaway(FfmpegBlock(3600.0, 90_000, 54_000, 0), 3600.0, 0.05) is None
    # Under the floor, however few frames were read.
    assert runaway(FfmpegBlock(None, DUP_FLOOR + 1, DUP_FLOOR, 0), None, 0.05) is None
    # Over the floor, but under the ratio.
    read = DUP_FLOOR // DUP_RATIO + 10
    assert runaway(FfmpegBlock(None, read + DUP_FLOOR + 1, DUP_FLOOR + 1, 0), None, 0.05) is None
    why = runaway(FfmpegBlock(None, 26 + 60_000, 60_000, 0), None, 0.05)
    assert why is not None
    assert "repeated frames 60000 times for the 26 it read" in why


def test_ffmpeg_parser_reports_each_block() -> None:
    """The ffmpeg parser hands every complete block, in any chunking, to on_block with its position and frame counts."""
    blocks: list[FfmpegBlock] = []
    p = FfmpegProgress(10.0, on_block=blocks.append)
    data = _block() + _block(2_000_000, frame=51, dup=3, drop=1)
    for i in range(0, len(data), 7):
        p.feed(data[i : i + 7])
    assert blocks == [
        FfmpegBlock(None, 0, 0, 0),
        FfmpegBlock(2.0, 51, 3, 1),
    ]
    assert blocks[1].frames_read == 49


# The runner, through a fake reactor


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.answers.update(
        {"bomb.mkv": _info(36000.04, "video"), "result.partial.avi": _info(36000.04)}
    )
    return harness


def test_input_over_the_limit_fails_at_the_probe(h: Harness) -> None:
    """An input longer than max_input_duration kills the encoder at once and fails the job with the limit's message; no log, output or progress is kept."""
    h.start(FFMPEG, {"file": "bomb.mkv"}, max_input_duration=4 * 3600.0)
    (h.job_dir / "encoder.log").write_bytes(b"ffmpeg was here")
    h.output()
    [spawned] = h.spawns
    assert h.killed == [(spawned, signal.SIGKILL)]
    h.end(sig=signal.SIGKILL)
    [outcome] = h.outcomes
    assert (outcome.state, outcome.error, outcome.log_tail) == (
        JobState.FAILED,
        LIMIT_MESSAGE,
        None,
    )
    assert not (h.job_dir / "encoder.log").exists()
    assert not (h.job_dir / "result.partial.avi").exists()
    assert h.progress == []


def test_input_over_the_limit_waiting_for_its_probe_starts_no_encoder(h: Harness) -> None:
    """An input that does not look like media is probed before any encoder starts: over the limit, none starts at all."""
    h.start(FFMPEG, {"file": "bomb.mkv"}, max_input_duration=4 * 3600.0, sniff=lambda p: False)
    assert h.reactor.spawned == []
    [outcome] = h.outcomes
    assert (outcome.state, outcome.error) == (JobState.FAILED, LIMIT_MESSAGE)


def test_input_under_the_limit_encodes(h: Harness) -> None:
    """An input within the limit is encoded and succeeds as before."""
    h.start(FFMPEG, {"file": "bomb.mkv"}, max_input_duration=11 * 3600.0)
    h.proto.childDataReceived(1, _block(0, frame=1) + _block(920_078, frame=26, progress="end"))
    h.output()
    h.end()
    [outcome] = h.outcomes
    assert outcome.state is JobState.SUCCEEDED, outcome
    assert h.killed == []
    assert h.progress[-1] == 100.0


def test_repeating_encoder_is_killed_without_grace(h: Harness) -> None:
    """An ffmpeg whose progress shows it repeating frames far beyond what it read is killed at once (no TERM: it ignores TERM there) and the job fails saying why."""
    h.start(FFMPEG, {"file": "bomb.mkv"}, max_input_duration=None)
    h.proto.childDataReceived(1, _block(400_000_000, frame=10_010, dup=10_000))
    assert h.killed == []
    h.proto.childDataReceived(1, _block(2_400_000_000, frame=60_026, dup=60_000))
    [spawned] = h.spawns
    assert h.killed == [(spawned, signal.SIGKILL)]
    h.output()
    h.end(sig=signal.SIGKILL)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith("stopped: the encoder had repeated frames 60000 times")
    assert not (h.job_dir / "result.partial.avi").exists()


def test_output_past_the_input_is_stopped(h: Harness) -> None:
    """An output position far past the input's probed duration (a header that understates) stops the encode with a reason."""
    h.answers["short.mkv"] = _info(10.0, "video")
    h.start(FFMPEG, {"file": "short.mkv"})
    h.proto.childDataReceived(1, _block(20_000_000, frame=500))
    assert h.killed == []
    h.proto.childDataReceived(1, _block(40_000_000, frame=1000))
    assert h.killed == [(h.spawns[0], signal.SIGKILL)]
    h.end(sig=signal.SIGKILL)
    [outcome] = h.outcomes
    assert (outcome.state, outcome.error) == (
        JobState.FAILED,
        "stopped: the output reached 40 s, far past the input's 10.00 s",
    )


def test_cancel_after_a_runaway_stop_changes_nothing(h: Harness) -> None:
    """A DELETE that comes after the runaway stop neither signals again nor turns the failure into a cancellation."""
    execution = h.start(FFMPEG, {"file": "bomb.mkv"})
    h.proto.childDataReceived(1, _block(frame=60_026, dup=60_000))
    execution.cancel()
    h.reactor.advance(10)
    assert h.killed == [(h.spawns[0], signal.SIGKILL)]
    h.end(sig=signal.SIGKILL)
    [outcome] = h.outcomes
    assert outcome.state is JobState.FAILED


# Configuration


def test_max_input_duration_option() -> None:
    """--max-input-duration defaults to 4 h and takes the duration syntax of the other time options."""
    options = Options()
    options.parseOptions([])
    assert options["max-input-duration"] == 4 * 3600.0
    options = Options()
    options.parseOptions(["--max-input-duration", "90m"])
    assert options["max-input-duration"] == 5400.0


def test_mp4_profile_keeps_variable_frame_rate() -> None:
    """The built-in mp4-h264 profile asks ffmpeg not to repeat frames to a constant rate."""
    argv = builtin_profiles()["mp4-h264"].argv
    i = argv.index("-fps_mode")
    assert argv[i + 1] == "vfr"


# End to end: a real server, real ffmpeg, real files that claim hours


def _claiming(path: Path, seconds: int) -> Path:
    """26 frames at 320x240, the 26th stamped at C{seconds}: a file that claims C{seconds}."""
    run_ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=d=2:size=320x240:r=25"),
        *("-vf", f"setpts='if(eq(N,25),{seconds}/TB,PTS)'", "-frames:v", "26"),
        *("-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "ultrafast", str(path)),
    )
    return path


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=70) as answer:
        return json.load(answer)


def _upload(server: ServerProcess, clip: Path, query: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.url}/jobs?{query}", data=clip.read_bytes(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 201
        job: dict[str, Any] = json.load(answer)
    return job


def _follow(server: ServerProcess, job_id: str, within: float) -> list[dict[str, Any]]:
    """Long-poll the job until it finishes; every state seen. Fails if it runs past C{within} s."""
    deadline = time.monotonic() + within
    seen = [_get(f"{server.url}/jobs/{job_id}")]
    while seen[-1]["state"] in ("queued", "running"):
        left = deadline - time.monotonic()
        assert left > 0, f"job {job_id} still {seen[-1]['state']} after {within} s: {seen[-1]}"
        seen.append(_get(f"{server.url}/jobs/{job_id}?wait={min(10, max(1, int(left)))}"))
    return seen


def _frames(path: Path) -> int:
    done = subprocess.run(
        [
            *("ffprobe", "-v", "error", "-select_streams", "v", "-count_packets"),
            *("-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(path)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


def test_ten_hour_claim_encodes_within_a_minute(tmp_path: Path) -> None:
    """The 30 KB file of 26 frames claiming 10 h, under a limit that lets it in, becomes an MP4 of 26 frames lasting 10 h within a minute (it ran for minutes, repeating the last frame 900,000 times)."""
    bomb = _claiming(tmp_path / "bomb.mkv", 36000)
    server = ServerProcess(tmp_path / "data", "--max-input-duration", "11h")
    try:
        job = _upload(server, bomb, "profile=mp4-h264")
        final = _follow(server, job["id"], within=60)[-1]
        assert final["state"] == "succeeded", final["error"]
        assert final["progress"] == 100
        assert final["output"]["duration"] == pytest.approx(36000.04, abs=0.1)
        result = tmp_path / "result.mp4"
        with urllib.request.urlopen(server.url + final["output"]["result_url"], timeout=30) as r:
            result.write_bytes(r.read())
        assert _frames(result) == 26
    finally:
        server.stop()


def test_ten_hour_claim_fails_at_the_probe_under_the_default_limit(tmp_path: Path) -> None:
    """Under the default --max-input-duration (4 h) the 10 h file fails with the limit's message, and no encoder output or log is kept."""
    bomb = _claiming(tmp_path / "bomb.mkv", 36000)
    data = tmp_path / "data"
    server = ServerProcess(data)
    try:
        job = _upload(server, bomb, "profile=mp4-h264")
        final = _follow(server, job["id"], within=60)[-1]
        assert final["state"] == "failed", final
        assert final["error"]["message"] == LIMIT_MESSAGE
        assert final["output"] is None
        left = {p.name for p in (data / "jobs" / job["id"]).iterdir()}
        assert not {n for n in left if n.startswith("result") or n == "encoder.log"}, left
    finally:
        server.stop()


def test_one_hour_claim_finishes_with_progress_100(tmp_path: Path) -> None:
    """A file claiming 1 h, under the default limit, succeeds quickly with its progress reaching 100, and its result holds its 26 frames, not 90,000."""
    clip = _claiming(tmp_path / "hour.mkv", 3600)
    server = ServerProcess(tmp_path / "data")
    try:
        job = _upload(server, clip, "profile=mp4-h264&preset=ultrafast")
        seen = _follow(server, job["id"], within=60)
        final = seen[-1]
        assert final["state"] == "succeeded", final["error"]
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress)
        assert progress[-1] == 100
        assert final["output"]["duration"] == pytest.approx(3600.04, abs=0.1)
        result = tmp_path / "result.mp4"
        with urllib.request.urlopen(server.url + final["output"]["result_url"], timeout=30) as r:
            result.write_bytes(r.read())
        assert _frames(result) == 26
    finally:
        server.stop()

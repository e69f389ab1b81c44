"""
The built-in profiles added for users (issue 17): a height limit on the video
profiles, webm-vp9, audio-mp3 and audio-aac, each run by execute_job on the
real encoders and checked with ffprobe; their outputs pass the runner's own
verification (the job succeeds only then).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from conftest import ffprobe_json, run_ffmpeg
from twisted.internet import reactor

from transcoder.core.jobs import JobState
from transcoder.core.profiles import ParamValue, builtin_profiles
from transcoder.engine.outcome import Outcome
from transcoder.engine.runner import execute_job

if TYPE_CHECKING:
    from conftest import Clips

PROFILES = builtin_profiles()
VIDEO_PROFILES = ("mp4-h264", "webm-vp9")


async def _run(
    job_dir: Path,
    profile: str,
    inputs: Mapping[str, Path],
    params: Mapping[str, str] | None = None,
) -> Outcome:
    """Run C{profile} as a job would: its parameters checked from strings, as a client sends them."""
    p = PROFILES[profile]
    job_dir.mkdir()
    checked: dict[str, ParamValue] = p.validate_params(dict(params or {}))
    execution = execute_job(
        reactor,
        job_dir=job_dir,
        profile=p,
        inputs=inputs,
        params=checked,
        timeout=60,
        on_progress=lambda _: None,
        on_spawn=lambda _: None,
    )
    return await execution.deferred


def _streams(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in doc["streams"] if s["codec_type"] == kind]


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    """2 s clips with audio at 320x240 and at odd sizes, wide and tall."""
    d = tmp_path_factory.mktemp("odd")
    clips = {}
    for w, h in [(320, 240), (321, 241), (99, 175)]:
        path = d / f"{w}x{h}.mp4"
        run_ffmpeg(
            *("-f", "lavfi", "-i", f"testsrc=size={w}x{h}:rate=25:duration=2"),
            *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=2"),
            # yuv444p: x264 takes odd sizes in it, where yuv420p needs even ones.
            *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p"),
            *("-c:a", "aac", "-b:a", "64k", "-shortest", str(path)),
        )
        clips[(w, h)] = path
    return clips


@pytest.mark.parametrize("profile", VIDEO_PROFILES)
@pytest_twisted.ensureDeferred
async def test_height_scales_down_keeps_aspect_never_up_and_even(
    profile: str, odd_clips: dict[tuple[int, int], Path], tmp_path: Path
) -> None:
    """
    height=H gives a picture at most H lines high (the source's height if that
    is less: never scaled up), both sides even, the width at the source's
    aspect ratio within the rounding to even; odd sources included, and
    with the default height (4320) a source keeps its size, odd sides
    rounded down to even.
    """
    cases: list[tuple[tuple[int, int], str | None, tuple[int, int]]] = [
        ((320, 240), None, (320, 240)),
        ((320, 240), "720", (320, 240)),
        ((320, 240), "120", (160, 120)),
        ((321, 241), None, (318, 240)),
        ((321, 241), "101", (132, 100)),
        ((99, 175), "120", (66, 120)),
        ((99, 175), None, (98, 174)),
    ]
    for i, ((sw, sh), height, expected) in enumerate(cases):
        params = {"height": height} if height else {}
        outcome = await _run(tmp_path / str(i), profile, {"file": odd_clips[(sw, sh)]}, params)
        assert outcome.state is JobState.SUCCEEDED, (sw, sh, height, outcome.error)
        assert outcome.output is not None
        [video] = _streams(ffprobe_json(tmp_path / str(i) / outcome.output.path), "video")
        w, h = video["width"], video["height"]
        limit = min(sh, int(height or 4320))
        assert w % 2 == 0 and h % 2 == 0
        assert limit - 1 <= h <= limit and w <= sw
        assert abs(w / h - sw / sh) <= 2 / h
        assert (w, h) == expected


@pytest_twisted.ensureDeferred
async def test_webm_vp9(clips: Clips, tmp_path: Path) -> None:
    """webm-vp9 gives VP9 and Opus in WebM, every frame kept, the duration the input's."""
    outcome = await _run(tmp_path / "job", "webm-vp9", {"file": clips.av}, {"crf": "40"})
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert outcome.output is not None
    assert (outcome.output.path, outcome.output.media_type) == ("result.webm", "video/webm")
    doc = ffprobe_json(tmp_path / "job" / "result.webm")
    assert doc["format"]["format_name"] == "matroska,webm"
    [video] = _streams(doc, "video")
    [audio] = _streams(doc, "audio")
    assert (video["codec_name"], audio["codec_name"]) == ("vp9", "opus")
    assert (video["width"], video["height"]) == (320, 240)
    assert int(video["nb_read_frames"]) == 75
    assert abs(float(doc["format"]["duration"]) - 3.0) <= 0.15
    assert outcome.output.duration is not None
    assert abs(outcome.output.duration - 3.0) <= 0.15


@pytest.mark.parametrize(
    ("profile", "name", "media_type", "codec", "format_name"),
    [
        ("audio-mp3", "result.mp3", "audio/mpeg", "mp3", "mp3"),
        ("audio-aac", "result.m4a", "audio/mp4", "aac", "mov,mp4,m4a,3gp,3g2,mj2"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_audio_profiles_keep_the_audio_alone(
    profile: str, name: str, media_type: str, codec: str, format_name: str, clips: Clips,
    tmp_path: Path,
) -> None:  # fmt: skip
    """audio-mp3 and audio-aac give one audio stream, no video, lasting as long as the input."""
    outcome = await _run(tmp_path / "job", profile, {"file": clips.av}, {"abitrate": "96"})
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert outcome.output is not None
    assert (outcome.output.path, outcome.output.media_type) == (name, media_type)
    doc = ffprobe_json(tmp_path / "job" / name)
    assert doc["format"]["format_name"] == format_name
    assert [s["codec_type"] for s in doc["streams"]] == ["audio"]
    assert doc["streams"][0]["codec_name"] == codec
    assert abs(float(doc["format"]["duration"]) - 3.0) <= 0.15
    assert int(doc["format"]["bit_rate"]) < 160_000


@pytest.mark.parametrize(
    ("profile", "clip", "kind"),
    [("audio-mp3", "flv_video", "audio"), ("audio-aac", "flv_video", "audio"),
     ("webm-vp9", "mp3_audio", "video")],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_an_input_without_the_stream_fails_saying_so(
    profile: str, clip: str, kind: str, clips: Clips, tmp_path: Path
) -> None:
    """
    A video-only input to an audio profile (an audio-only one to webm-vp9)
    fails with "input file has no audio stream", not ffmpeg's words about
    stream maps, and leaves no output.
    """
    outcome = await _run(tmp_path / "job", profile, {"file": getattr(clips, clip)})
    assert outcome.state is JobState.FAILED
    assert outcome.error == f"input file has no {kind} stream"
    assert not [p for p in (tmp_path / "job").iterdir() if p.name.startswith("result")]

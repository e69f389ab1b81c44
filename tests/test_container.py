"""
Tests for transcoder._container: an output's duration from its own header.

The reference is ffprobe's C{format.duration}, on files the real encoders
write at test time: the in-process reader must say the same, or nothing.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import run_ffmpeg
from hypothesis import given, settings
from hypothesis import strategies as st

from transcoder._container import header_duration
from transcoder.probe import tool_env
from transcoder.profiles import builtin_profiles

if TYPE_CHECKING:
    from conftest import Clips

FfprobeJson = Callable[[Path], dict[str, Any]]
PROFILES = builtin_profiles()
# ffprobe prints microseconds.
_SAME = 2e-6


def _encode(profile: str, inputs: dict[str, Path], output: Path) -> None:
    """Run a built-in profile's command line as the runner builds it."""
    spec = PROFILES[profile]
    argv = spec.build_argv(
        {role: str(path) for role, path in inputs.items()},
        str(output),
        {n: p.default for n, p in spec.parameters.items()},
    )
    subprocess.run(
        argv,
        env=tool_env(home=output.parent),
        cwd=output.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def outputs(clips: Clips, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What each built-in profile makes of the test clips, and a few other real files."""
    d = tmp_path_factory.mktemp("outputs")
    made = {
        "mp4-h264": d / "h264.mp4",
        "avi-mpeg4": d / "mpeg4.avi",
        "mux-avi": d / "mux.avi",
        # moov at the end: ffmpeg without +faststart.
        "moov-last": d / "moov-last.mp4",
        "ffmpeg-avi": d / "ffmpeg.avi",
        "audio-mp4": d / "audio.m4a",
        "mov": d / "clip.mov",
    }
    _encode("mp4-h264", {"file": clips.av}, made["mp4-h264"])
    _encode("avi-mpeg4", {"file": clips.av}, made["avi-mpeg4"])
    _encode("mux-avi", {"video": clips.flv_video, "audio": clips.mp3_audio}, made["mux-avi"])
    run_ffmpeg("-i", str(clips.av), "-c", "copy", str(made["moov-last"]))
    run_ffmpeg("-i", str(clips.av), "-c:v", "mpeg4", "-c:a", "libmp3lame", str(made["ffmpeg-avi"]))
    run_ffmpeg("-i", str(clips.av), "-vn", "-c:a", "copy", str(made["audio-mp4"]))
    run_ffmpeg("-i", str(clips.av), "-c", "copy", str(made["mov"]))
    return made


def _ffprobe_duration(ffprobe_json: FfprobeJson, path: Path) -> float:
    return float(ffprobe_json(path)["format"]["duration"])


@pytest.mark.parametrize(
    "name", ["mp4-h264", "avi-mpeg4", "mux-avi", "moov-last", "ffmpeg-avi", "audio-mp4", "mov"]
)
def test_same_duration_as_ffprobe(
    outputs: dict[str, Path], ffprobe_json: FfprobeJson, name: str
) -> None:
    """
    Every built-in profile's output, and AVI and MP4/MOV files as ffmpeg writes
    them (the moov box last, audio only), read as the duration ffprobe reports.
    """
    path = outputs[name]
    stated = header_duration(path)
    assert stated is not None
    assert stated == pytest.approx(_ffprobe_duration(ffprobe_json, path), abs=_SAME)


def test_avi_streams_of_fixed_sample_size_do_not_count(
    outputs: dict[str, Path], ffprobe_json: FfprobeJson
) -> None:
    """
    mencoder's constant-rate MP3 in AVI has a fixed sample size, for which
    libavformat states no duration: the file's duration is its video's, and
    the reader gives the same.
    """
    doc = ffprobe_json(outputs["avi-mpeg4"])
    audio = [s for s in doc["streams"] if s["codec_type"] == "audio"]
    video = [s for s in doc["streams"] if s["codec_type"] == "video"]
    assert "duration" not in audio[0] or audio[0]["duration"] == "N/A"
    assert header_duration(outputs["avi-mpeg4"]) == pytest.approx(
        float(video[0]["duration"]), abs=_SAME
    )


@pytest.mark.parametrize("name", ["mp4-h264", "avi-mpeg4", "mux-avi", "moov-last"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_cut_files_are_not_read(
    outputs: dict[str, Path], tmp_path: Path, name: str, keep: float
) -> None:
    """A file cut short anywhere gives no answer (ffprobe is asked instead)."""
    data = outputs[name].read_bytes()
    cut = tmp_path / outputs[name].name
    cut.write_bytes(data[: int(len(data) * keep)])
    assert header_duration(cut) is None


@pytest.mark.parametrize("name", ["mp4-h264", "mux-avi"])
def test_trailing_bytes_are_not_read(outputs: dict[str, Path], tmp_path: Path, name: str) -> None:
    """Bytes after the container's last box or chunk give no answer."""
    padded = tmp_path / outputs[name].name
    padded.write_bytes(outputs[name].read_bytes() + b"\0" * 64)
    assert header_duration(padded) is None


def _patched(source: Path, target: Path, find: bytes, offset: int, value: bytes) -> Path:
    data = bytearray(source.read_bytes())
    at = data.index(find)
    data[at + offset : at + offset + len(value)] = value
    target.write_bytes(data)
    return target


def test_corrupt_avi_headers(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An AVI whose header is damaged or unusual gives no answer."""
    source = outputs["mux-avi"]
    damaged = [
        # The RIFF chunk claims more than the file holds.
        _patched(source, tmp_path / "riff.avi", b"RIFF", 4, struct.pack("<I", 2**31)),
        # The video stream's rate is zero.
        _patched(source, tmp_path / "rate.avi", b"strh", 8 + 24, struct.pack("<I", 0)),
        # The stream starts late.
        _patched(source, tmp_path / "start.avi", b"strh", 8 + 28, struct.pack("<I", 5)),
        # The header list is not one.
        _patched(source, tmp_path / "hdrl.avi", b"hdrl", 0, b"hdrX"),
        # The header list runs past the RIFF chunk.
        _patched(source, tmp_path / "strl.avi", b"LIST", 4, struct.pack("<I", 10**6)),
    ]
    for path in damaged:
        assert header_duration(path) is None, path.name


def test_avi_without_audio_or_video_streams(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An AVI whose streams are neither audio nor video gives no answer."""
    data = bytearray(outputs["mux-avi"].read_bytes())
    for kind in (b"vids", b"auds"):
        at = data.index(b"strh" + struct.pack("<I", 56) + kind)
        data[at + 8 : at + 12] = b"txts"
    (tmp_path / "text.avi").write_bytes(data)
    assert header_duration(tmp_path / "text.avi") is None


def test_corrupt_mp4_headers(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An MP4 whose header is damaged, fragmented or states no duration gives no answer."""
    source = outputs["mp4-h264"]
    damaged = [
        # The movie box claims more than the file holds.
        _patched(source, tmp_path / "moov.mp4", b"moov", -4, struct.pack(">I", 2**31)),
        # The movie header's timescale is zero.
        _patched(source, tmp_path / "scale.mp4", b"mvhd", 4 + 12, struct.pack(">I", 0)),
        # The movie header states no duration.
        _patched(source, tmp_path / "duration.mp4", b"mvhd", 4 + 16, struct.pack(">I", 0)),
        # A version of the movie header that does not exist.
        _patched(source, tmp_path / "version.mp4", b"mvhd", 4, b"\x07"),
        # Fragmented: a movie-extends box in the movie box (the udta box renamed).
        _patched(source, tmp_path / "mvex.mp4", b"udta", 0, b"mvex"),
        # No media data.
        _patched(source, tmp_path / "mdat.mp4", b"mdat", 0, b"skip"),
        # Neither track is audio or video.
        _patched(
            _patched(source, tmp_path / "h1.mp4", b"vide", 0, b"text"),
            tmp_path / "handlers.mp4",
            b"soun",
            0,
            b"text",
        ),
    ]
    for path in damaged:
        assert header_duration(path) is None, path.name


def test_files_it_does_not_read(clips: Clips, tmp_path: Path) -> None:
    """Other containers, random bytes, an empty or missing file: no answer."""
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    riff = tmp_path / "riff.avi"
    riff.write_bytes(b"RIFF" + struct.pack("<I", 4 + 4096) + b"AVI " + os.urandom(4096))
    ftyp = tmp_path / "ftyp.mp4"
    ftyp.write_bytes(struct.pack(">I", 4096) + b"ftyp" + os.urandom(4088))
    for path in (
        clips.flv_video,
        clips.mp3_audio,
        clips.noise,
        empty,
        riff,
        ftyp,
        tmp_path / "missing.mp4",
    ):
        assert header_duration(path) is None, path.name


def test_terminated_mencoder_output(
    clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson
) -> None:
    """
    mencoder stopped with SIGTERM part-way finalises a valid but short AVI:
    the reader gives its real, short duration, as ffprobe does (the runner
    fails such a job on its exit code and on the duration).
    """
    spec = PROFILES["avi-mpeg4"]
    output = tmp_path / "short.avi"
    argv = spec.build_argv(
        {"file": str(clips.av_long)},
        str(output),
        {n: p.default for n, p in spec.parameters.items()},
    )
    encoder = subprocess.Popen(
        argv,
        env=tool_env(home=tmp_path),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not output.exists() or output.stat().st_size < 64 * 1024:
        assert time.monotonic() < deadline and encoder.poll() is None
        time.sleep(0.02)
    encoder.send_signal(signal.SIGTERM)
    assert encoder.wait(30) != 0
    stated = header_duration(output)
    assert stated is not None
    assert stated == pytest.approx(_ffprobe_duration(ffprobe_json, output), abs=_SAME)
    assert stated < 12 * 0.95


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), kind=st.sampled_from([b"", b"avi", b"mp4"]))
def test_any_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes, kind: bytes) -> None:
    """Whatever the bytes, behind an AVI or MP4 signature or not, it answers without raising."""
    if kind == b"avi":
        data = b"RIFF" + struct.pack("<I", len(data) + 4) + b"AVI " + data
    elif kind == b"mp4":
        data = struct.pack(">I", 16) + b"ftypisom" + bytes(4) + data
    path = tmp_path_factory.mktemp("bytes") / "file"
    path.write_bytes(data)
    stated = header_duration(path)
    assert stated is None or stated >= 0


@settings(max_examples=300, deadline=None)
@given(at=st.integers(0, 700), value=st.binary(min_size=1, max_size=8))
def test_damaged_real_headers(
    outputs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    at: int,
    value: bytes,
) -> None:
    """Bytes overwritten anywhere in a real AVI's or MP4's header never make it raise."""
    d = tmp_path_factory.mktemp("damaged")
    for name in ("mux-avi", "mp4-h264"):
        data = bytearray(outputs[name].read_bytes())
        data[at : at + len(value)] = value
        path = d / outputs[name].name
        path.write_bytes(data)
        stated = header_duration(path)
        assert stated is None or stated >= 0

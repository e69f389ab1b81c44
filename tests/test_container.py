"""
Tests for transcoder.engine.container: what an output holds, from its own tables.

The reference is ffprobe (its C{format.duration}, and the packets it counts),
on files the real encoders write at test time: the in-process reader must say
the same, or nothing.
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

from transcoder.core.profiles import builtin_profiles
from transcoder.engine.container import read_contents
from transcoder.engine.probe import parse_ffprobe, tool_env
from transcoder.engine.verify import Contents, from_probe, shortfall

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


def header_duration(path: Path) -> float | None:
    """The duration the reader finds stated, if it reads the file."""
    contents = read_contents(path)
    return None if contents is None else contents.duration


def _complete(contents: Contents | None) -> bool:
    return contents is not None and shortfall(contents, 0.1) is None


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
def test_cut_files_are_never_whole(
    outputs: dict[str, Path], tmp_path: Path, name: str, keep: float
) -> None:
    """A file cut short anywhere is never taken as whole: either no answer (ffprobe counts it) or a shortfall."""
    data = outputs[name].read_bytes()
    cut = tmp_path / outputs[name].name
    cut.write_bytes(data[: int(len(data) * keep)])
    assert not _complete(read_contents(cut))


def test_trailing_bytes(outputs: dict[str, Path], tmp_path: Path) -> None:
    """Bytes after an MP4's last box give no answer; after an AVI's RIFF chunk, its frames are still counted, all there."""
    for name in ("mp4-h264", "mux-avi"):
        padded = tmp_path / outputs[name].name
        padded.write_bytes(outputs[name].read_bytes() + b"\0" * 64)
        contents = read_contents(padded)
        if name == "mp4-h264":
            assert contents is None
        else:
            assert _complete(contents), contents


def _patched(source: Path, target: Path, find: bytes, offset: int, value: bytes) -> Path:
    data = bytearray(source.read_bytes())
    at = data.index(find)
    data[at + offset : at + offset + len(value)] = value
    target.write_bytes(data)
    return target


def test_corrupt_avi_headers(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An AVI whose header is damaged or unusual gives no answer."""
    source = outputs["mux-avi"]
    riff = _patched(source, tmp_path / "riff.avi", b"RIFF", 4, struct.pack("<I", 2**31))
    # The RIFF chunk claims more than the file holds: a file cut short.
    contents = read_contents(riff)
    assert contents is not None and contents.defect is not None
    assert "bytes short of its RIFF header's size" in contents.defect
    assert shortfall(contents, 0.1) is not None
    damaged = [
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


# What the file holds, against what its header states (issue 14)


_COUNT = (
    "ffprobe",
    "-v",
    "error",
    "-count_packets",
    "-show_format",
    "-show_streams",
    "-of",
    "json",
)


def _counted(path: Path) -> Contents:
    """What ffprobe, reading every packet, finds the file holds."""
    done = subprocess.run(
        [*_COUNT, str(path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return from_probe(parse_ffprobe(done.stdout))


@pytest.fixture(scope="module")
def noisy_avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's clip (30 s of noisy 320x240 at 25 fps) as avi-mpeg4 makes it at 20 Mbit/s."""
    d = tmp_path_factory.mktemp("noisy")
    clip = d / "noise.mov"
    run_ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=duration=30:size=320x240:rate=25,noise=alls=20:allf=t"),
        *("-c:v", "mpeg4", "-b:v", "100k", str(clip)),
    )
    spec = PROFILES["avi-mpeg4"]
    output = d / "noisy.avi"
    argv = spec.build_argv({"file": str(clip)}, str(output), {"vbitrate": 20000, "abitrate": 128})
    subprocess.run(
        argv, env=tool_env(home=d), cwd=d, stdin=subprocess.DEVNULL, capture_output=True, check=True
    )
    return output


def test_whole_outputs_hold_what_they_state(outputs: dict[str, Path], noisy_avi: Path) -> None:
    """Every real output holds every frame or sample its header states, counted from its index or sample tables, as ffprobe counts them."""
    for path in [*outputs.values(), noisy_avi]:
        contents = read_contents(path)
        assert contents is not None, path.name
        assert contents.defect is None
        assert shortfall(contents, 0.1) is None, path.name
        assert shortfall(_counted(path), 0.1) is None, path.name
    contents = read_contents(noisy_avi)
    assert contents is not None
    assert [(s.kind, s.stated, s.held) for s in contents.streams] == [("video", 750, 750)]


def test_avi_cut_short_holds_only_its_chunks(noisy_avi: Path, tmp_path: Path) -> None:
    """
    An AVI cut short, its header still saying 750 frames and its index lost
    (as mencoder leaves it on a full disk): the chunks in the file are
    counted, as ffprobe reads them, and far short of 750.
    """
    data = noisy_avi.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 2 // 5])
    contents = read_contents(cut)
    assert contents is not None and contents.duration == 30.0
    [video] = contents.streams
    counted = _counted(cut)
    assert video.stated == 750 and 200 < video.held < 400
    # ffprobe also counts the last chunk, torn by the cut; the reader does not.
    assert [s.held for s in counted.streams if s.kind == "video"] in (
        [video.held],
        [video.held + 1],
    )
    missing = shortfall(contents, 0.1)
    assert missing is not None
    assert missing.startswith(f"the output holds {video.held} of the 750 video frames")
    assert shortfall(counted, 0.1) is not None


def test_avi_header_stating_more_frames_than_its_index(
    outputs: dict[str, Path], tmp_path: Path
) -> None:
    """A complete AVI whose video header says ten times the frames its idx1 index lists is short of them."""
    source = outputs["mux-avi"]
    contents = read_contents(source)
    assert contents is not None
    frames = contents.streams[0].stated
    liar = _patched(source, tmp_path / "liar.avi", b"strh", 8 + 32, struct.pack("<I", frames * 10))
    missing = shortfall(read_contents(liar) or Contents(None), 0.1)
    assert missing is not None and f"holds {frames} of the {frames * 10} video frames" in missing


def test_avi_index_entry_past_the_end(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An idx1 entry pointing past the end of the file is a defect, however many frames the others cover."""
    data = bytearray(outputs["mux-avi"].read_bytes())
    idx1 = data.index(b"idx1")
    (length,) = struct.unpack_from("<I", data, idx1 + 4)
    last = idx1 + 8 + length - 16
    struct.pack_into("<I", data, last + 8, len(data) * 2)
    broken = tmp_path / "past.avi"
    broken.write_bytes(data)
    contents = read_contents(broken)
    assert contents is not None
    assert contents.defect == "1 index entries point past the end of the file"
    assert shortfall(contents, 1000.0) is not None


def test_mp4_cut_short(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An MP4 with its sample tables first, cut in its media data: the samples past the end are a defect, and ffprobe counting finds it short too."""
    data = outputs["mp4-h264"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    contents = read_contents(cut)
    assert contents is not None and contents.defect is not None
    assert contents.defect.endswith("samples lie past the end of the file")
    video = next(s for s in contents.streams if s.kind == "video")
    assert 0 < video.held < video.stated
    assert shortfall(contents, 0.1) is not None
    assert shortfall(_counted(cut), 0.1) is not None


def test_mp4_movie_header_longer_than_its_samples(outputs: dict[str, Path], tmp_path: Path) -> None:
    """An MP4 whose movie header states ten times what its sample tables add up to is short of it."""
    source = outputs["mp4-h264"]
    data = source.read_bytes()
    at = data.index(b"mvhd")
    (duration,) = struct.unpack_from(">I", data, at + 4 + 16)
    liar = _patched(
        source, tmp_path / "liar.mp4", b"mvhd", 4 + 16, struct.pack(">I", duration * 10)
    )
    contents = read_contents(liar)
    assert contents is not None
    missing = shortfall(contents, 0.1)
    assert missing is not None and missing.startswith("the output's streams hold 3.")


def test_mp4_sample_tables_claiming_too_much(outputs: dict[str, Path], tmp_path: Path) -> None:
    """Sample tables whose counts exceed what their boxes hold give no answer rather than huge reads."""
    source = outputs["mp4-h264"]
    for table, offset in ((b"stsz", 4 + 8), (b"stts", 4 + 4), (b"stco", 4 + 4), (b"stsc", 4 + 4)):
        path = _patched(source, tmp_path / "t.mp4", table, offset, struct.pack(">I", 2**31))
        assert read_contents(path) is None, table


def test_an_mp4_that_shows_a_frame_after_a_long_gap_holds_its_duration(tmp_path: Path) -> None:
    """A variable-frame-rate MP4 whose last frame is shown 10 h in (decoding times uniform, the gap in the composition offsets): every sample is there and the samples span the 36000 s the header states, so it is whole."""
    bomb = tmp_path / "bomb.mkv"
    run_ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=d=2:size=320x240:r=25"),
        *("-vf", "setpts='if(eq(N,25),36000/TB,PTS)'", "-frames:v", "26"),
        *("-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "ultrafast", str(bomb)),
    )
    out = tmp_path / "out.mp4"
    run_ffmpeg("-i", str(bomb), "-c:v", "libx264", "-fps_mode", "vfr", "-f", "mp4", str(out))
    contents = read_contents(out)
    assert contents is not None
    (video,) = contents.streams
    assert (video.stated, video.held) == (26, 26)
    assert video.held_seconds == pytest.approx(36000, abs=1)
    assert contents.duration == pytest.approx(36000, abs=1)
    assert shortfall(contents, 1.0) is None

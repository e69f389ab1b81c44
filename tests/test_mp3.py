"""
Tests for transcoder.engine.mp3: what an MP3 output holds, from its frames.

The reference is ffprobe, on MP3s that ffmpeg's libmp3lame writes at test
time (with and without the Xing/Info frame and the ID3v2 tag, stereo and mono,
MPEG 1 and 2): the in-process reader must say the same, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ffmpeg
from hypothesis import given, settings
from hypothesis import strategies as st

from transcoder.engine.container import read_contents
from transcoder.engine.verify import shortfall

FfprobeJson = Callable[[Path], dict[str, Any]]


@pytest.fixture(scope="module")
def mp3s(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MP3s as ffmpeg writes them: the audio-mp3 profile's kind, a tagged one, and a mono MPEG-2 one with no Xing frame and no tag."""
    d = tmp_path_factory.mktemp("mp3")
    made = {"stereo": d / "stereo.mp3", "tagged": d / "tagged.mp3", "bare": d / "bare.mp3"}
    sine = ["-f", "lavfi", "-i", "sine=frequency=440:duration=20"]
    run_ffmpeg(*sine, "-ac", "2", "-c:a", "libmp3lame", "-b:a", "192k", str(made["stereo"]))
    run_ffmpeg(*sine, "-c:a", "libmp3lame", "-metadata", "title=" + "x" * 300, str(made["tagged"]))
    run_ffmpeg(
        *sine,
        "-ac",
        "1",
        "-ar",
        "22050",
        "-c:a",
        "libmp3lame",
        "-b:a",
        "64k",
        "-write_xing",
        "0",
        "-id3v2_version",
        "0",
        str(made["bare"]),
    )
    return made


@pytest.mark.parametrize("name", ["stereo", "tagged", "bare"])
def test_same_duration_and_frames_as_ffprobe(
    mp3s: dict[str, Path], ffprobe_json: FfprobeJson, name: str
) -> None:
    """Each MP3 reads as ffprobe's duration (to its microsecond rounding) and as many frames as ffprobe decodes, all held."""
    contents = read_contents(mp3s[name])
    assert contents is not None
    doc = ffprobe_json(mp3s[name])
    assert contents.duration == pytest.approx(float(doc["format"]["duration"]), abs=2e-3)
    (stream,) = contents.streams
    assert stream.held == stream.stated == int(doc["streams"][0]["nb_read_frames"])
    assert shortfall(contents, 0.1) is None


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_an_mp3_cut_short_holds_less_than_its_xing_frame_states(
    mp3s: dict[str, Path], tmp_path: Path, keep: float
) -> None:
    """An MP3 cut short (as by a full disk) states the whole duration in its Xing frame but holds only the frames before the cut: a shortfall."""
    data = mp3s["stereo"].read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: int(len(data) * keep)])
    contents = read_contents(cut)
    assert contents is not None
    assert contents.duration == pytest.approx(20.0, abs=0.1)
    refused = shortfall(contents, 0.1)
    assert refused is not None and "audio frames" in refused


def test_an_mp3_without_a_xing_frame_cut_short_lasts_what_it_holds(
    mp3s: dict[str, Path], tmp_path: Path
) -> None:
    """With no Xing frame nothing is stated: a cut file's duration is what its frames hold, which the duration check then refuses."""
    data = mp3s["bare"].read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    contents = read_contents(cut)
    assert contents is not None and contents.duration is not None
    assert 9.0 < contents.duration < 11.0


def test_lost_sync_gives_no_answer(mp3s: dict[str, Path], tmp_path: Path) -> None:
    """Garbage in the middle of the frames makes the reader give up (ffprobe then counts the file)."""
    data = bytearray(mp3s["stereo"].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(bytes(data))
    assert read_contents(damaged) is None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096), tagged=st.booleans())
def test_any_bytes_behind_an_mp3_start(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, tagged: bool
) -> None:
    """Whatever follows an ID3 tag or a frame sync, the reader answers without raising."""
    head = b"ID3\x04\x00\x00\x00\x00\x00\x10" if tagged else b"\xff\xfb\x90\x64"
    path = tmp_path_factory.mktemp("bytes") / "file.mp3"
    path.write_bytes(head + data)
    contents = read_contents(path)
    assert contents is None or (contents.duration or 0) >= 0

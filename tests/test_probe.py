"""Tests for transcoder.engine.probe: asking ffprobe what a file is."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from transcoder.engine.probe import (
    MediaInfo,
    NotMediaError,
    ProbeTimeout,
    StreamInfo,
    parse_ffprobe,
    probe,
    probe_counting,
    tool_env,
)
from transcoder.testing import FakeReactor

if TYPE_CHECKING:
    from conftest import Clips


def _doc(**overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "streams": [
            {"index": 0, "codec_type": "video", "codec_name": "h264", "duration": "3.000000"},
            {"index": 1, "codec_type": "audio", "codec_name": "aac", "duration": "3.021333"},
        ],
        "format": {"format_name": "mov,mp4,m4a,3gp,3g2,mj2", "duration": "3.021333"},
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_parse_document() -> None:
    """ffprobe's JSON becomes a MediaInfo with the container's duration and every stream."""
    info = parse_ffprobe(_doc())
    assert info == MediaInfo(
        3.021333,
        "mov,mp4,m4a,3gp,3g2,mj2",
        (
            StreamInfo("video", "h264", duration=3.0),
            StreamInfo("audio", "aac", duration=3.021333),
        ),
    )
    assert info.codecs("audio") == ["aac"]


def test_parse_counts() -> None:
    """A stream's stated frame count and rate, and the packets ffprobe counted, are kept; "N/A" and "0/0" are none."""
    info = parse_ffprobe(
        _doc(
            streams=[
                {
                    "codec_type": "video",
                    "codec_name": "mpeg4",
                    "nb_frames": "750",
                    "nb_read_packets": "292",
                    "avg_frame_rate": "25/1",
                },
                {
                    "codec_type": "audio",
                    "codec_name": "mp3",
                    "nb_frames": "N/A",
                    "avg_frame_rate": "0/0",
                },
            ]
        )
    )
    video, audio = info.streams
    assert (video.frames, video.packets, video.frame_rate) == (750, 292, 25.0)
    assert (audio.frames, audio.packets, audio.frame_rate) == (None, None, None)


def test_parse_duration_from_streams() -> None:
    """Without a container duration, the longest audio or video stream's is used."""
    info = parse_ffprobe(_doc(format={"format_name": "avi", "duration": "N/A"}))
    assert info.duration == 3.021333


def test_parse_no_duration() -> None:
    """With no duration anywhere, the duration is None."""
    doc = _doc(
        format={"format_name": "avi"},
        streams=[{"codec_type": "video", "codec_name": "mjpeg", "duration": "N/A"}],
    )
    assert parse_ffprobe(doc).duration is None


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"not json",
        b"[1, 2]",
        _doc(streams=[]),
        _doc(streams=[{"codec_type": "data", "codec_name": "bin_data"}]),
        _doc(streams=[{"codec_type": "subtitle", "codec_name": "ass"}]),
        _doc(streams="nonsense"),
    ],
)
def test_parse_not_media(document: bytes) -> None:
    """Non-JSON, or a file without audio or video streams, is not media."""
    with pytest.raises(NotMediaError, match="not a recognised media file"):
        parse_ffprobe(document)


def test_tool_env_is_minimal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool's environment has a PATH and a locale, and none of the server's other variables."""
    monkeypatch.setenv("TRANSCODER_SECRET", "hunter2")
    env = tool_env(Path("/jobs/x"))
    assert env["PATH"] == os.environ["PATH"]
    assert env["LANG"] == "C.UTF-8"
    assert env["HOME"] == "/jobs/x"
    assert set(env) == {"PATH", "LANG", "HOME"}
    assert "HOME" not in tool_env()


def test_spawn_arguments() -> None:
    """ffprobe runs through C{setpriv --pdeathsig KILL} (it dies with the node), with an explicit environment and the file named through the file: protocol."""
    fake = FakeReactor()
    probe(fake, Path("/data/odd:name.avi"))
    [spawned] = fake.spawned
    assert os.path.basename(spawned["executable"]) == "setpriv"
    assert spawned["args"][:3] == ["setpriv", "--pdeathsig", "KILL"]
    assert spawned["args"][3] == shutil.which("ffprobe")
    assert spawned["args"][-1] == "file:/data/odd:name.avi"
    assert "-show_streams" in spawned["args"]
    assert spawned["env"]["PATH"]
    assert spawned["proto"].transport.stdin_closed


def test_output_in_pieces() -> None:
    """Output arriving in pieces is parsed once ffprobe has ended successfully."""
    fake = FakeReactor()
    results: list[MediaInfo] = []
    probe(fake, Path("/x.mp4")).addCallback(results.append)
    proto = fake.spawned[0]["proto"]
    document = _doc()
    proto.childDataReceived(1, document[:10])
    proto.childDataReceived(2, b"some warning\n")
    proto.childDataReceived(1, document[10:])
    assert results == []
    proto.processEnded(Failure(ProcessDone(0)))
    assert results == [parse_ffprobe(document)]
    assert fake.getDelayedCalls() == []


def test_failure_is_not_media() -> None:
    """A non-zero exit of ffprobe means the file is not media."""
    fake = FakeReactor()
    failures: list[Failure] = []
    probe(fake, Path("/x.mp4")).addErrback(failures.append)
    fake.spawned[0]["proto"].processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert failures[0].type is NotMediaError


def test_timeout_kills() -> None:
    """After the timeout ffprobe is killed, and the result is ProbeTimeout once it has ended."""
    fake = FakeReactor()
    failures: list[Failure] = []
    probe(fake, Path("/x.mp4"), timeout=7).addErrback(failures.append)
    proto = fake.spawned[0]["proto"]
    fake.advance(6.9)
    assert proto.transport.signals == []
    fake.advance(0.1)
    assert proto.transport.signals == ["KILL"]
    assert failures == []
    proto.processEnded(Failure(ProcessTerminated(signal=9)))
    assert failures[0].type is ProbeTimeout
    assert isinstance(failures[0].value, NotMediaError)


def test_cancel_kills() -> None:
    """Cancelling the probe kills ffprobe, and its later end changes nothing."""
    fake = FakeReactor()
    failures: list[Failure] = []
    d = probe(fake, Path("/x.mp4"))
    d.addErrback(failures.append)
    d.cancel()
    proto = fake.spawned[0]["proto"]
    assert proto.transport.signals == ["KILL"]
    assert failures[0].type is CancelledError
    proto.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(failures) == 1
    assert fake.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_real_media(clips: Clips) -> None:
    """ffprobe reads the generated clips: streams, container and duration."""
    av = await probe(reactor, clips.av)
    assert av.codecs("video") == ["h264"] and av.codecs("audio") == ["aac"]
    assert av.duration is not None and abs(av.duration - 3.0) < 0.1
    flv = await probe(reactor, clips.flv_video)
    assert (
        flv.format_name == "flv" and flv.codecs("video") == ["flv1"] and flv.codecs("audio") == []
    )
    mp3 = await probe(reactor, clips.mp3_audio)
    assert mp3.codecs("audio") == ["mp3"] and mp3.codecs("video") == []
    assert av.streams[0].packets is None


@pytest_twisted.ensureDeferred
async def test_real_packet_count(clips: Clips) -> None:
    """Counting, ffprobe reads every packet of the file: a 3 s clip at 25 fps has 75 video packets."""
    av = await probe_counting(reactor, clips.av)
    video = [s for s in av.streams if s.codec_type == "video"]
    assert video[0].packets == 75


@pytest_twisted.ensureDeferred
async def test_real_noise(clips: Clips, tmp_path: Path) -> None:
    """Random bytes, an empty file and a missing file are not media."""
    empty = tmp_path / "empty.mp4"
    empty.touch()
    for path in (clips.noise, empty, tmp_path / "missing.mp4"):
        with pytest.raises(NotMediaError, match="not a recognised media file"):
            await probe(reactor, path)


@pytest_twisted.ensureDeferred
async def test_real_timeout(tmp_path: Path) -> None:
    """An ffprobe stuck opening a FIFO nobody writes to is killed at the timeout."""
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ProbeTimeout, match=r"timed out after 0\.5 s"):
        await probe(reactor, fifo, timeout=0.5)

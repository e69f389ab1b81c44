"""
Shared fixtures: small media clips generated with ffmpeg at test time.

The clips are synthetic (lavfi testsrc and sine), a few seconds at 320x240, so
the whole set takes well under a second to make.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# A throwaway PostgreSQL cluster and a database per test: the fixtures postgres_cluster, pg_dsn.
pytest_plugins = ["pg"]


@dataclass(frozen=True)
class Clips:
    # 3 s of H.264 + AAC in MP4.  Not AVI: mencoder's own AVI demuxer, with
    # -noskip, turns an ffmpeg-made AVI with MP3 audio into a single frame.
    av: Path
    # The same, 12 s, for tests that stop an encoder part-way.
    av_long: Path
    # 3 s of FLV1 video, no audio.
    flv_video: Path
    # 3 s of MP3.
    mp3_audio: Path
    # 64 KiB of random bytes under a video's name.
    noise: Path


def ffprobe_json(path: Path) -> dict[str, Any]:
    """ffprobe's view of C{path}, format and streams, with frames counted."""
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_format",
            "-show_streams",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def run_ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly on these arguments; fail the test if it fails."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", *args],
        check=True,
        timeout=60,
        capture_output=True,
    )


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """
    A tmpfs of C{size} (C{"64m"}) mounted at C{where} for the block's length:
    a small disk to fill.  The tests run as root, so a mount that fails is
    a failure, not a skip.
    """
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {where}: {r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def _video(seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc=size=320x240:rate=25:duration={seconds}"]


def _audio(seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]


def _av(path: Path, seconds: float) -> Path:
    run_ffmpeg(
        *_video(seconds),
        *_audio(seconds),
        *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"),
        *("-c:a", "aac", "-b:a", "64k", "-shortest", str(path)),
    )
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    """The test clips, made once per session."""
    d = tmp_path_factory.mktemp("clips")
    flv_video = d / "video.flv"
    run_ffmpeg(*_video(3), "-c:v", "flv1", "-an", str(flv_video))
    mp3_audio = d / "audio.mp3"
    run_ffmpeg(*_audio(3), "-c:a", "libmp3lame", "-b:a", "64k", str(mp3_audio))
    noise = d / "noise.avi"
    # Seeded: a fresh os.urandom() now and then holds a run that ffprobe takes
    # for MPEG audio frames, and every "not media" test failed that session.
    noise.write_bytes(random.Random(1).randbytes(64 * 1024))
    return Clips(
        av=_av(d / "av.mp4", 3),
        av_long=_av(d / "av_long.mp4", 12),
        flv_video=flv_video,
        mp3_audio=mp3_audio,
        noise=noise,
    )


@pytest.fixture(name="ffprobe_json", scope="session")
def ffprobe_json_fixture() -> Callable[[Path], dict[str, Any]]:
    """L{ffprobe_json}, for tests that would rather not import from conftest."""
    return ffprobe_json

"""
Decoding a job's images (L{transcoder.engine.images}) with the real ffmpeg:
every image in one run, what each decoded to, and refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import run_ffmpeg
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from zope.interface import implementer

from transcoder.engine.images import Picture, decode_images, parse_framemd5
from transcoder.engine.probe import NotMediaError


@implementer(IReactorProcess, IReactorTime)
class CountingReactor:
    """The real reactor, counting the processes spawned through it."""

    def __init__(self) -> None:
        self.spawned: list[list[str]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], **kw: Any) -> Any:
        self.spawned.append(list(args))
        return reactor.spawnProcess(proto, executable, args, **kw)  # type: ignore[attr-defined]

    def callLater(self, *a: Any, **kw: Any) -> Any:
        return reactor.callLater(*a, **kw)  # type: ignore[attr-defined]

    def seconds(self) -> float:
        return reactor.seconds()  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three JPEGs of a test pattern: two at 160x120, one at 64x48."""
    d = tmp_path_factory.mktemp("jpegs")
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120", "-frames:v", "2", str(d / "a-%d.jpg"))
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1", str(d / "b.jpg"))
    return [d / "a-1.jpg", d / "a-2.jpg", d / "b.jpg"]


@pytest_twisted.ensureDeferred
async def test_all_images_are_decoded_in_one_run(jpegs: list[Path]) -> None:
    """Three images give three pictures, each with its own size and one frame, from one ffmpeg process."""
    counting = CountingReactor()
    pictures = await decode_images(counting, jpegs)  # type: ignore[arg-type]
    assert pictures == [Picture(160, 120, 1), Picture(160, 120, 1), Picture(64, 48, 1)]
    assert len(counting.spawned) == 1
    assert sum(a == "-i" for a in counting.spawned[0]) == 3


@pytest_twisted.ensureDeferred
async def test_a_file_that_is_no_image_fails_the_run(jpegs: list[Path], tmp_path: Path) -> None:
    """Random bytes under a .jpg name among good images fail the whole run with NotMediaError; so does an empty file."""
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(bytes(range(256)) * 12)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for bad in (junk, empty):
        with pytest.raises(NotMediaError):
            await decode_images(reactor, [*jpegs, bad])  # type: ignore[arg-type]


def test_framemd5_listing_is_read_per_input() -> None:
    """Dimensions come from the header lines and frames are counted per stream; an input with neither reads as 0x0 with no frame."""
    listing = (
        b"#format: frame checksums\n#version: 2\n"
        b"#media_type 0: video\n#dimensions 0: 320x180\n"
        b"#media_type 1: video\n#dimensions 1: 64x48\n"
        b"#stream#, dts, pts, duration, size, hash\n"
        b"0,  0,  0,  1,  86400, abc\n1,  0,  0,  1,  4608, def\n1,  1,  1,  1,  4608, 012\n"
    )
    assert parse_framemd5(listing, 3) == [
        Picture(320, 180, 1),
        Picture(64, 48, 2),
        Picture(0, 0, 0),
    ]

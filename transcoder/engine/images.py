"""
Decoding a job's images (thumbnails, posters) to prove they are pictures.

All of a job's images are decoded by one C{ffmpeg} run that writes a
C{framemd5} listing (each input's dimensions, a line per decoded frame):
starting a tool costs more than decoding a small JPEG, and one C{ffprobe}
per image made a ten-thumbnail job twice as long as its encode.  When that
run fails, each image is decoded alone, to name the one at fault.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess

from transcoder.engine.probe import run_reader

# A listing is about 60 bytes per image plus a line per frame: an image2
# input that turned out to be a long stream would say far more.
_MAX_OUTPUT = 1024 * 1024
DECODE_TIMEOUT = 60.0

_DIMENSIONS = re.compile(rb"^#dimensions (\d+): (\d+)x(\d+)$", re.MULTILINE)
_FRAME = re.compile(rb"^(\d+),", re.MULTILINE)


@dataclass(frozen=True)
class Picture:
    """What decoding one image gave."""

    width: int
    height: int
    frames: int


DecodeImages = Callable[[IReactorProcess, Sequence[Path]], Deferred[list[Picture]]]


def parse_framemd5(listing: bytes, inputs: int) -> list[Picture]:
    """The L{Picture} of each of C{inputs} inputs, from ffmpeg's framemd5 listing."""
    sizes: dict[int, tuple[int, int]] = {}
    for m in _DIMENSIONS.finditer(listing):
        sizes[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    frames = [0] * inputs
    for m in _FRAME.finditer(listing):
        stream = int(m.group(1))
        if stream < inputs:
            frames[stream] += 1
    return [Picture(*sizes.get(i, (0, 0)), frames[i]) for i in range(inputs)]


def decode_images(
    reactor: IReactorProcess, paths: Sequence[Path], timeout: float = DECODE_TIMEOUT
) -> Deferred[list[Picture]]:
    """
    Decode the first video stream of each of C{paths} in one C{ffmpeg} run.

    @param reactor: must also provide L{IReactorTime}.
    @return: fires with a L{Picture} per path, in order; fails with
        L{NotMediaError} when ffmpeg cannot open or decode one of them
        (L{ProbeTimeout} after killing it).  Cancelling it kills ffmpeg.
    """
    argv = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-xerror"]
    for path in paths:
        # The file: protocol keeps a name with a colon from being taken for a URL.
        argv += ["-i", "file:" + str(Path(path).absolute())]
    for i in range(len(paths)):
        argv += ["-map", f"{i}:v:0"]
    argv += ["-f", "framemd5", "-"]
    return run_reader(
        reactor, argv, lambda out: parse_framemd5(out, len(paths)), timeout, _MAX_OUTPUT
    )

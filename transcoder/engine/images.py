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
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from transcoder.engine.deathsig import tied_to_node
from transcoder.engine.probe import NotMediaError, ProbeTimeout, tool_env

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


class _DecodeProtocol(ProcessProtocol):
    def __init__(self, done: Deferred[list[Picture]], inputs: int) -> None:
        self._done = done
        self._inputs = inputs
        self._out = bytearray()
        self._overflow = False
        self.timed_out: float | None = None
        self.timer: IDelayedCall | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1 and not self._overflow:
            self._out += data
            if len(self._out) > _MAX_OUTPUT:
                self._overflow = True
                self._out.clear()

    def kill(self) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self._done.called:
            return
        if self.timed_out is not None:
            self._done.errback(ProbeTimeout(f"ffmpeg timed out after {self.timed_out:g} s"))
        elif not isinstance(reason.value, ProcessDone):
            self._done.errback(NotMediaError("ffmpeg could not decode it"))
        elif self._overflow:
            self._done.errback(NotMediaError("ffmpeg said too much"))
        else:
            self._done.callback(parse_framemd5(bytes(self._out), self._inputs))


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
    clock = IReactorTime(reactor)
    env = tool_env()
    ffmpeg = shutil.which("ffmpeg", path=env["PATH"])
    if ffmpeg is None:
        return fail(FileNotFoundError("ffmpeg is not installed (not on PATH)"))

    def cancel(d: Deferred[list[Picture]]) -> None:
        proto.kill()

    done: Deferred[list[Picture]] = Deferred(cancel)
    proto = _DecodeProtocol(done, len(paths))

    def expire() -> None:
        proto.timed_out = timeout
        proto.kill()

    proto.timer = clock.callLater(timeout, expire)
    argv = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-xerror"]
    for path in paths:
        # The file: protocol keeps a name with a colon from being taken for a URL.
        argv += ["-i", "file:" + str(Path(path).absolute())]
    for i in range(len(paths)):
        argv += ["-map", f"{i}:v:0"]
    argv += ["-f", "framemd5", "-"]
    executable, args = tied_to_node(ffmpeg, argv, env["PATH"])
    try:
        reactor.spawnProcess(proto, executable, args, env=env, childFDs={0: "w", 1: "r", 2: "r"})
    except OSError as e:
        proto.timer.cancel()
        return fail(e)
    if proto.transport is not None:
        proto.transport.closeStdin()
    return done

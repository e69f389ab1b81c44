"""
Ask ffprobe what a file is, without blocking the reactor.

Inputs are probed before an encoder ever sees them: mencoder takes some
garbage for raw DV and "succeeds", ffprobe rejects it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from transcoder.engine.deathsig import tied_to_node

# ffprobe's JSON for a real file is a few KiB; a file that makes it say more is
# not something we want to transcode.
_MAX_OUTPUT = 4 * 1024 * 1024
_MEDIA_TYPES = frozenset({"audio", "video"})
# Seconds an ffprobe counting an output's packets may take: it reads the whole
# file (about a second per GB from the page cache).
COUNT_TIMEOUT = 600.0

_T = TypeVar("_T")


class NotMediaError(Exception):
    """ffprobe could not read the file, or found no audio or video in it."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            f"not a recognised media file: {detail}" if detail else "not a recognised media file"
        )
        self.detail = detail


class ProbeTimeout(NotMediaError):
    """ffprobe took longer than allowed and was killed."""


@dataclass(frozen=True)
class StreamInfo:
    codec_type: str
    codec_name: str
    # What the stream's header states (None where it states nothing), and the
    # packets ffprobe read of it (only with count_packets).
    duration: float | None = None
    frames: int | None = None
    frame_rate: float | None = None
    packets: int | None = None
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class MediaInfo:
    # Seconds; None when neither the container nor any stream states it.
    duration: float | None
    format_name: str
    streams: tuple[StreamInfo, ...]

    def codecs(self, codec_type: str) -> list[str]:
        """The codec names of the streams of one type (C{"video"}, C{"audio"})."""
        return [s.codec_name for s in self.streams if s.codec_type == codec_type]

    @property
    def height(self) -> int | None:
        """The first video stream's height, if it states one."""
        return next((s.height for s in self.streams if s.codec_type == "video"), None)

    def describe(self) -> dict[str, Any]:
        """What a client is shown of an input: container, duration, its audio and video streams."""
        streams: list[dict[str, Any]] = []
        for s in self.streams:
            if s.codec_type not in _MEDIA_TYPES:
                continue
            entry: dict[str, Any] = {"type": s.codec_type, "codec": s.codec_name}
            if s.codec_type == "video":
                rate = round(s.frame_rate, 3) if s.frame_rate is not None else None
                entry.update(width=s.width, height=s.height, frame_rate=rate)
            else:
                entry.update(sample_rate=s.sample_rate, channels=s.channels)
            streams.append(entry)
        return {"container": self.format_name, "duration": self.duration, "streams": streams}


def tool_env(home: Path | None = None) -> dict[str, str]:
    """
    The whole environment of a spawned tool: a search path, a UTF-8 locale and
    nothing else from ours, so no secret of the server leaks into a child.
    """
    env = {"PATH": os.environ.get("PATH") or os.defpath, "LANG": "C.UTF-8"}
    if home is not None:
        env["HOME"] = str(home)
    return env


def parse_ffprobe(document: bytes) -> MediaInfo:
    """
    Turn the JSON of C{ffprobe -show_format -show_streams -of json} into a
    L{MediaInfo}.

    @raise NotMediaError: it is not such a document, or names no audio or
        video stream.
    """
    try:
        doc = json.loads(document)
    except (ValueError, UnicodeDecodeError):
        raise NotMediaError("ffprobe said something that is not JSON") from None
    if not isinstance(doc, dict):
        raise NotMediaError("ffprobe said something unexpected")
    fmt = doc.get("format")
    fmt = fmt if isinstance(fmt, dict) else {}
    raw_streams = doc.get("streams")
    streams: list[StreamInfo] = []
    durations: list[float] = []
    for s in raw_streams if isinstance(raw_streams, list) else []:
        if not isinstance(s, dict):
            continue
        d = _seconds(s.get("duration"))
        streams.append(
            StreamInfo(
                str(s.get("codec_type", "unknown")),
                str(s.get("codec_name", "unknown")),
                duration=d,
                frames=_count(s.get("nb_frames")),
                frame_rate=_rate(s.get("avg_frame_rate")),
                packets=_count(s.get("nb_read_packets")),
                width=_count(s.get("width")),
                height=_count(s.get("height")),
                sample_rate=_count(s.get("sample_rate")),
                channels=_count(s.get("channels")),
            )
        )
        if d is not None and s.get("codec_type") in _MEDIA_TYPES:
            durations.append(d)
    if not any(s.codec_type in _MEDIA_TYPES for s in streams):
        raise NotMediaError("no audio or video stream")
    duration = _seconds(fmt.get("duration"))
    if duration is None and durations:
        duration = max(durations)
    return MediaInfo(duration, str(fmt.get("format_name", "unknown")), tuple(streams))


def _seconds(value: Any) -> float | None:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _count(value: Any) -> int | None:
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 0 else None


def _rate(value: Any) -> float | None:
    """A rate as ffprobe writes it, C{"25/1"}; None for C{"0/0"} and anything odd."""
    if not isinstance(value, str):
        return None
    num, _, den = value.partition("/")
    try:
        rate = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


class _ReaderProtocol(ProcessProtocol, Generic[_T]):
    """A tool's standard output, bounded, turned into a result by C{parse} at its exit."""

    def __init__(
        self, tool: str, done: Deferred[_T], parse: Callable[[bytes], _T], limit: int
    ) -> None:
        self._tool = tool
        self._done = done
        self._parse = parse
        self._limit = limit
        self._out = bytearray()
        self._overflow = False
        self.timed_out: float | None = None
        self.timer: IDelayedCall | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # stderr is drained and dropped: -v error keeps it short, and its
        # content is not worth showing to a client.
        if childFD == 1 and not self._overflow:
            self._out += data
            if len(self._out) > self._limit:
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
            self._done.errback(ProbeTimeout(f"{self._tool} timed out after {self.timed_out:g} s"))
        elif not isinstance(reason.value, ProcessDone):
            self._done.errback(NotMediaError(f"{self._tool} could not read it"))
        elif self._overflow:
            self._done.errback(NotMediaError(f"{self._tool} said too much"))
        else:
            try:
                result = self._parse(bytes(self._out))
            except NotMediaError as e:
                self._done.errback(e)
            else:
                self._done.callback(result)


def run_reader(
    reactor: IReactorProcess,
    argv: list[str],
    parse: Callable[[bytes], _T],
    timeout: float,
    limit: int = _MAX_OUTPUT,
) -> Deferred[_T]:
    """
    Run the tool C{argv[0]} (ffprobe, ffmpeg) as a child that dies with this
    process (L{transcoder.engine.deathsig}), and C{parse} what it wrote on its
    standard output (at most C{limit} bytes).

    @param reactor: must also provide L{IReactorTime}.
    @return: fires with C{parse}'s result, or fails with L{NotMediaError}
        (L{ProbeTimeout} after killing a tool that ran past C{timeout}).
        Cancelling it kills the tool.
    """
    clock = IReactorTime(reactor)
    env = tool_env()
    tool = argv[0]
    executable = shutil.which(tool, path=env["PATH"])
    if executable is None:
        return fail(FileNotFoundError(f"{tool} is not installed (not on PATH)"))

    def cancel(d: Deferred[_T]) -> None:
        proto.kill()

    done: Deferred[_T] = Deferred(cancel)
    proto = _ReaderProtocol(tool, done, parse, limit)

    def expire() -> None:
        proto.timed_out = timeout
        proto.kill()

    proto.timer = clock.callLater(timeout, expire)
    # Bound to die with this process: a probe of a huge or stalled input
    # would otherwise outlive a killed node.
    executable, args = tied_to_node(executable, argv, env["PATH"])
    try:
        reactor.spawnProcess(proto, executable, args, env=env, childFDs={0: "w", 1: "r", 2: "r"})
    except OSError as e:
        proto.timer.cancel()
        return fail(e)
    if proto.transport is not None:
        proto.transport.closeStdin()
    return done


def probe(
    reactor: IReactorProcess,
    path: Path,
    timeout: float = 60,
    count_packets: bool = False,
) -> Deferred[MediaInfo]:
    """
    Run C{ffprobe} on C{path} (L{run_reader}).

    @return: fires with a L{MediaInfo}, or fails with L{NotMediaError}
        (L{ProbeTimeout} after killing an ffprobe that ran past C{timeout}).
        Cancelling it kills ffprobe.
    """
    argv = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json"]
    if count_packets:
        argv.insert(3, "-count_packets")
    # The file: protocol keeps a name with a colon from being taken for a URL.
    argv.append("file:" + str(Path(path).absolute()))
    return run_reader(reactor, argv, parse_ffprobe, timeout)


def probe_counting(reactor: IReactorProcess, path: Path) -> Deferred[MediaInfo]:
    """L{probe} counting packets, with time to read a big file through."""
    return probe(reactor, path, timeout=COUNT_TIMEOUT, count_packets=True)

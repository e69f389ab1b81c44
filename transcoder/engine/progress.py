"""
Parsers for the progress the encoders print, fed raw pipe data in any chunking.

Each parser's C{feed} returns the newest percentage (0 to 100) that a complete
status line or block carried, or C{None} when the data completed none.  They
never raise on malformed input: an encoder's output is not ours to trust.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

# A status line longer than this is not a status line; it is dropped whole so
# that garbage without line ends cannot grow the buffer without bound.
MAX_LINE = 4096

_MENCODER_POS = re.compile(rb"Pos:\s*(-?\d+(?:\.\d+)?)s\s+\d+f\s*\(\s*(\d+)\s*%\)")
_FFMPEG_LINE = re.compile(rb"^\s*([a-z_]+)=(.*?)\s*$")
_INT = re.compile(rb"^-?\d+$")
_CLOCK = re.compile(rb"^(-?)(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def _clamp(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return min(100.0, max(0.0, value))


def _usable_duration(duration: float | None) -> float | None:
    if duration is None or not math.isfinite(duration) or duration <= 0:
        return None
    return duration


class _Lines:
    """Split a byte stream into lines at any of C{ends}, whatever the chunking."""

    def __init__(self, ends: bytes) -> None:
        self._split = re.compile(b"[" + re.escape(ends) + b"]")
        self._partial = b""
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        pieces = self._split.split(data)
        complete: list[bytes] = []
        for piece in pieces[:-1]:
            if not self._skipping:
                line = self._partial + piece
                if len(line) <= MAX_LINE:
                    complete.append(line)
            self._partial = b""
            self._skipping = False
        if not self._skipping:
            self._partial += pieces[-1]
            if len(self._partial) > MAX_LINE:
                self._partial = b""
                self._skipping = True
        return complete


class _Progress:
    """What both parsers share: the input's duration, set now or once a probe has told it."""

    def __init__(self, duration: float | None) -> None:
        self._duration = _usable_duration(duration)
        self._lines = _Lines(b"\r\n")
        self.latest: float | None = None

    @property
    def duration(self) -> float | None:
        """The input's duration in seconds; settable once a probe has told it."""
        return self._duration

    @duration.setter
    def duration(self, duration: float | None) -> None:
        self._duration = _usable_duration(duration)


class MencoderProgress(_Progress):
    """
    mencoder's status lines on stdout, each ended by C{\\r}::

        Pos:  12.3s    308f (28%) 184.05fps Trem:   0min   3mb  A-V:0.000 [0:0]

    The position in seconds over the input's duration is the percentage; the
    C{(NN%)} figure counts bytes of the input (it starts well above zero and
    can pass 100), so it is used only when the duration is unknown.
    """

    def feed(self, data: bytes) -> float | None:
        newest: float | None = None
        for line in self._lines.feed(data):
            m = _MENCODER_POS.search(line)
            if m is None:
                continue
            if self._duration is not None:
                newest = _clamp(float(m.group(1)) / self._duration * 100.0)
            else:
                newest = _clamp(float(m.group(2)))
        if newest is not None:
            self.latest = newest
        return newest


@dataclass(frozen=True)
class FfmpegBlock:
    """
    What one complete C{-progress} block said: the output position in seconds,
    the frames encoded, and of those how many ffmpeg invented (C{dup_frames})
    or dropped to keep a constant frame rate; C{None} where it said nothing usable.
    """

    position: float | None
    frames: int | None
    dup_frames: int | None
    drop_frames: int | None

    @property
    def frames_read(self) -> int | None:
        """Frames that came from the input: encoded, less invented, plus dropped."""
        if self.frames is None or self.dup_frames is None:
            return None
        return max(0, self.frames - self.dup_frames + (self.drop_frames or 0))


_COUNTS = {b"frame": "frames", b"dup_frames": "dup_frames", b"drop_frames": "drop_frames"}


class FfmpegProgress(_Progress):
    """
    ffmpeg's C{-progress pipe:1} output: C{key=value} lines in blocks, each
    block ended by C{progress=continue} (or C{progress=end} at the end).

    C{out_time_us} is the output position in microseconds (as is the misnamed
    C{out_time_ms}); early blocks may say C{N/A}, and it can be negative
    while the audio encoder primes.
    """

    def __init__(
        self, duration: float | None, on_block: Callable[[FfmpegBlock], None] | None = None
    ) -> None:
        super().__init__(duration)
        self._position: float | None = None
        self._counts: dict[str, int] = {}
        # Told of every complete block (the runner watches for runaway encodes).
        self.on_block = on_block

    def feed(self, data: bytes) -> float | None:
        newest: float | None = None
        for line in self._lines.feed(data):
            m = _FFMPEG_LINE.match(line)
            if m is None:
                continue
            key, value = m.group(1), m.group(2)
            if key in (b"out_time_us", b"out_time_ms"):
                if _INT.match(value):
                    self._position = int(value) / 1e6
            elif key == b"out_time":
                seconds = _clock_seconds(value)
                if seconds is not None:
                    self._position = seconds
            elif key in _COUNTS:
                if _INT.match(value):
                    self._counts[_COUNTS[key]] = int(value)
            elif key == b"progress":
                block = self._block_end(value)
                if block is not None:
                    newest = block
        if newest is not None:
            self.latest = newest
        return newest

    def _block_end(self, value: bytes) -> float | None:
        position, self._position = self._position, None
        counts, self._counts = self._counts, {}
        if self.on_block is not None:
            self.on_block(
                FfmpegBlock(
                    position,
                    counts.get("frames"),
                    counts.get("dup_frames"),
                    counts.get("drop_frames"),
                )
            )
        if value == b"end":
            return 100.0
        if position is None or self._duration is None:
            return None
        return _clamp(position / self._duration * 100.0)


def _clock_seconds(value: bytes) -> float | None:
    m = _CLOCK.match(value)
    if m is None:
        return None
    seconds = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    return -seconds if m.group(1) else seconds

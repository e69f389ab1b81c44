"""
What an MP3 output holds, read in-process (see L{transcoder.engine.container}
for why outputs are read here rather than by ffprobe).

An MP3 has no index: it is a run of frames, each with a 4-byte header that
gives its length, after an optional ID3v2 tag.  The reader walks every frame
header (a 60 s file at 192 kbit/s has about 2,300 of them, read in blocks)
and counts the complete ones.  LAME, as ffmpeg's libmp3lame, writes a first
frame with a Xing/Info header stating how many frames follow: a file cut
short (a full disk) then holds fewer than it states.  The duration is the
stated frames' (else the held frames') as ffprobe computes it, without the
encoder's delay and padding, which are far under the duration check's slack.

Only MPEG audio layer III with a constant sample rate is read; a lost sync,
another layer, or a free-format frame gives C{None}, and ffprobe counts the
file instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from transcoder.engine.verify import Contents, Held

_BLOCK = 1 << 16
# Most frames walked: a 24 h file at 48 kHz has about 3.6 million.
_MAX_FRAMES = 1 << 22

# Bitrates (kbit/s) of layer III by MPEG version: 1, then 2 and 2.5.
_BITRATES = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


class _NotMp3(Exception):
    pass


def _frame(header: bytes) -> tuple[int, int, int, int]:
    """Length, sample rate, samples and side-info length of the frame whose header this is."""
    if header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        raise _NotMp3("lost frame sync")
    version = (header[1] >> 3) & 3  # 3: MPEG 1, 2: MPEG 2, 0: MPEG 2.5
    layer = (header[1] >> 1) & 3
    bitrate_index = header[2] >> 4
    rate_index = (header[2] >> 2) & 3
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        raise _NotMp3("not a layer III frame")
    mpeg1 = version == 3
    bitrate = _BITRATES[1 if mpeg1 else 2][bitrate_index] * 1000
    rate = _RATES[version][rate_index]
    padding = (header[2] >> 1) & 1
    samples = 1152 if mpeg1 else 576
    length = (samples // 8) * bitrate // rate + padding
    mono = header[3] >> 6 == 3
    side = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    return length, rate, samples, side


def read_mp3(path: Path) -> Contents | None:
    """What the MP3 at C{path} holds, or C{None} when this module cannot say for sure."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(10)
            at = 0
            if data[:3] == b"ID3" and len(data) == 10:
                tag = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
                at = 10 + tag + (10 if data[5] & 0x10 else 0)
            return _walk(f, at, size)
    except (_NotMp3, OSError, IndexError):
        return None


def _walk(stream: BinaryIO, at: int, size: int) -> Contents:
    end = size
    stream.seek(max(0, size - 128))
    if stream.read(3) == b"TAG":
        end = size - 128
    buffer, base = b"", at
    held = 0
    stated: int | None = None
    rate = spf = 0
    first = True
    while at + 4 <= end:
        if at + 4 > base + len(buffer):
            stream.seek(at)
            buffer, base = stream.read(_BLOCK), at
        header = buffer[at - base : at - base + 4]
        length, frame_rate, samples, side = _frame(header)
        if rate and (frame_rate, samples) != (rate, spf):
            raise _NotMp3("sample rate changes")
        rate, spf = frame_rate, samples
        if at + length > end:
            break
        if first:
            first = False
            stream.seek(at + 4 + side)
            xing = stream.read(12)
            buffer, base = b"", at
            if xing[:4] in (b"Xing", b"Info"):
                stated = int.from_bytes(xing[8:12], "big") if xing[7] & 1 else None
                at += length
                continue
        held += 1
        if held > _MAX_FRAMES:
            raise _NotMp3("too many frames")
        at += length
    if not rate:
        raise _NotMp3("no frame")
    count = stated if stated is not None else held
    seconds = count * spf / rate
    stream_held = Held("audio", count, min(held, count), seconds, min(held, count) * spf / rate)
    return Contents(seconds, (stream_held,))

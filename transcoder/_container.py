"""
The duration an AVI or MP4 file's own header states, read in-process.

An encoder's output is checked once it has exited, and nothing can overlap
that check: running ffprobe for it costs about 55 ms (most of it the dynamic
loader binding ffprobe's ~200 shared libraries), several percent of a short
job.  The header of the containers our encoders write tells the same thing
ffprobe would report, in a few reads of a few bytes each.

This reader answers only when it is sure: a single-RIFF AVI or a
non-fragmented MP4/MOV whose structure accounts for every byte of the file
and that has an audio or video stream with a stated length.  Anything else
(another container, an OpenDML AVI beyond 1 GiB, a file cut short or
padded, a field it does not expect) gives C{None}, and the caller asks
ffprobe as before.  The durations are computed as libavformat computes
them, so the answer matches ffprobe's C{format.duration}:

  - AVI: the longest of the audio and video streams, each C{dwLength *
    dwScale / dwRate} from its C{strh}, counted only for streams without a
    fixed sample size (libavformat states no duration for the others);
  - MP4/MOV: C{mvhd}'s duration over its timescale (libavformat takes the
    file's duration from there, not from the tracks).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

# Boxes or chunks looked at in one file before giving up: a real output has
# tens; a damaged one could describe millions of empty ones.
_MAX_ITEMS = 4096
# Longest stream header list of an AVI (one per stream), and most streams.
_MAX_STREAMS = 64

_AVI_MEDIA = (b"vids", b"auds")
_MP4_MEDIA = (b"vide", b"soun")


class _Unsure(Exception):
    """The file is not one this module reads with confidence."""


def header_duration(path: Path) -> float | None:
    """
    Seconds that C{path}'s container header states, or C{None} when it is
    not a complete, single-RIFF AVI or non-fragmented MP4/MOV with an audio
    or video stream of known length (the caller then asks ffprobe).
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return _avi_duration(f, size)
            if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return _mp4_duration(f, size)
    except (_Unsure, OSError, struct.error):
        pass
    return None


def _read(f: BinaryIO, at: int, n: int) -> bytes:
    f.seek(at)
    data = f.read(n)
    if len(data) != n:
        raise _Unsure("short read")
    return data


# AVI (RIFF)


def _chunks(f: BinaryIO, start: int, end: int) -> list[tuple[bytes, int, int, bytes]]:
    """
    The chunks between C{start} and C{end}: (id, offset of the data, size,
    list type or b"").  They must fill the range exactly (the last one may
    lack its pad byte).
    """
    found: list[tuple[bytes, int, int, bytes]] = []
    pos = start
    while pos < end:
        if len(found) >= _MAX_ITEMS or end - pos < 8:
            raise _Unsure("too many chunks, or a torn one")
        cid, size = struct.unpack("<4sI", _read(f, pos, 8))
        data = pos + 8
        if data + size > end:
            raise _Unsure("a chunk runs past its parent")
        kind = _read(f, data, 4) if cid in (b"LIST", b"RIFF") and size >= 4 else b""
        found.append((cid, data, size, kind))
        pos = data + size + (size & 1)
    if pos > end + 1:
        raise _Unsure("chunks overrun their parent")
    return found


def _avi_duration(f: BinaryIO, size: int) -> float | None:
    riff_size = struct.unpack("<I", _read(f, 4, 4))[0]
    # One RIFF chunk exactly as long as the file (or one pad byte short).
    # A longer file goes on in OpenDML's AVIX chunks, whose lengths this
    # reader does not add up; a shorter one was cut, and libavformat itself
    # then drops the header's lengths.
    if 8 + riff_size not in (size, size - 1) or riff_size < 4:
        return None
    top = _chunks(f, 12, 8 + riff_size)
    hdrl = [c for c in top if c[0] == b"LIST" and c[3] == b"hdrl"]
    if len(hdrl) != 1 or not any(c[0] == b"LIST" and c[3] == b"movi" for c in top):
        return None
    _, data, length, _ = hdrl[0]
    lists = [c for c in _chunks(f, data + 4, data + length) if c[3] == b"strl"]
    if not lists or len(lists) > _MAX_STREAMS:
        return None
    durations: list[float] = []
    for _, sdata, slength, _ in lists:
        strh = [c for c in _chunks(f, sdata + 4, sdata + slength) if c[0] == b"strh"]
        if len(strh) != 1 or strh[0][2] < 48:
            return None
        fields = _read(f, strh[0][1], 48)
        kind = fields[:4]
        scale, rate, start, frames = struct.unpack("<4I", fields[20:36])
        sample_size = struct.unpack("<I", fields[44:48])[0]
        if kind not in _AVI_MEDIA:
            continue
        if start != 0 or scale == 0 or rate == 0:
            # A delayed stream shifts libavformat's sums; let it do them.
            return None
        if sample_size == 0 and frames > 0:
            durations.append(frames * scale / rate)
    return max(durations) if durations else None


# MP4, MOV (ISO base media)


def _boxes(f: BinaryIO, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """
    The boxes between C{start} and C{end}: (type, offset of the body, body
    size).  They must fill the range exactly.
    """
    found: list[tuple[bytes, int, int]] = []
    pos = start
    while pos < end:
        if len(found) >= _MAX_ITEMS or end - pos < 8:
            raise _Unsure("too many boxes, or a torn one")
        size, kind = struct.unpack(">I4s", _read(f, pos, 8))
        header = 8
        if size == 1:
            size = struct.unpack(">Q", _read(f, pos + 8, 8))[0]
            header = 16
        elif size == 0 and kind == b"mdat":
            size = end - pos  # media data to the end of the file
        if size < header or pos + size > end:
            raise _Unsure("a box runs past its parent")
        found.append((kind, pos + header, size - header))
        pos += size
    return found


def _only(boxes: list[tuple[bytes, int, int]], kind: bytes) -> tuple[int, int]:
    matching = [(at, n) for k, at, n in boxes if k == kind]
    if len(matching) != 1:
        raise _Unsure(f"{len(matching)} {kind!r} boxes")
    return matching[0]


def _time_header(f: BinaryIO, at: int, n: int) -> tuple[int, int]:
    """(timescale, duration) of an C{mvhd} or C{mdhd} box's body."""
    version = _read(f, at, 1)[0]
    if version == 1 and n >= 32:
        timescale, duration = struct.unpack(">IQ", _read(f, at + 20, 12))
        unknown = 2**64 - 1
    elif version == 0 and n >= 20:
        timescale, duration = struct.unpack(">II", _read(f, at + 12, 8))
        unknown = 2**32 - 1
    else:
        raise _Unsure("unknown time header version")
    if timescale == 0 or duration in (0, unknown):
        raise _Unsure("no duration stated")
    return timescale, duration


def _mp4_duration(f: BinaryIO, size: int) -> float | None:
    top = _boxes(f, 0, size)
    kinds = {k for k, _, _ in top}
    if b"moof" in kinds or b"mdat" not in kinds:
        return None  # fragmented, or no media data
    moov = _boxes(f, *_extent(_only(top, b"moov")))
    if any(k == b"mvex" for k, _, _ in moov):
        return None  # fragmented: libavformat sums the fragments
    timescale, duration = _time_header(f, *_only(moov, b"mvhd"))
    media = False
    for kind, at, n in moov:
        if kind != b"trak":
            continue
        mdia = _boxes(f, *_extent(_only(_boxes(f, at, at + n), b"mdia")))
        hdlr_at, hdlr_n = _only(mdia, b"hdlr")
        if hdlr_n < 12:
            raise _Unsure("short hdlr")
        if _read(f, hdlr_at + 8, 4) in _MP4_MEDIA:
            _time_header(f, *_only(mdia, b"mdhd"))  # a media track with a length
            media = True
    return duration / timescale if media else None


def _extent(body: tuple[int, int]) -> tuple[int, int]:
    at, n = body
    return at, at + n

"""
What an AVI or MP4 output holds (an MP3's: L{transcoder.engine.mp3}), read
in-process: the duration its header states, and how much of each stream the
file itself holds.

An encoder's output is checked once it has exited, and nothing can overlap
that check: running ffprobe for it costs about 55 ms (most of it the dynamic
loader binding ffprobe's ~200 shared libraries), several percent of a short
job, and counting the packets, as the check needs, reads the whole file.  The
containers our encoders write say the same in a few reads.

A header alone is not believed: mencoder that hits a full disk exits 0 and
still writes a header for every frame it encoded.  So the reader counts what
the file holds:

  - AVI: the C{idx1} index entries of each stream (or, with no index, the
    chunks actually present in the C{movi} list), against the stream's
    C{strh} length; an entry past the end of the file, or a file shorter than
    its RIFF chunk, is a defect;
  - MP4/MOV: each track's samples from its sample tables (C{stts}, C{stsz},
    C{stsc}, C{stco}/C{co64}); a sample whose data lies past the end of the
    file is a defect.

The duration is computed as libavformat computes it, so it matches ffprobe's
C{format.duration}: for AVI the longest of the streams without a fixed
sample size (libavformat states none for the others), for MP4/MOV C{mvhd}'s.

The reader answers only when it is sure (a single-RIFF AVI, or a
non-fragmented MP4/MOV whose boxes account for every byte, the media data
alone being allowed to run past a cut end); anything else (another
container, an OpenDML AVI beyond 1 GiB, a field it does not expect, tables
too big) gives C{None}, and the caller has ffprobe count the packets
(L{transcoder.engine.verify.from_probe}).  Every read is bounded: a hostile file
costs at most a few tens of MB of reads.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from transcoder.engine.mp3 import read_mp3
from transcoder.engine.verify import Contents, Held

# Boxes or chunks looked at in one list before giving up: a real output has
# tens; a damaged one could describe millions of empty ones.
_MAX_ITEMS = 4096
# Longest stream header list of an AVI (one per stream), and most streams.
_MAX_STREAMS = 64
# Chunks walked in an AVI's movi list when it has no index (a 4 h film at
# 25 fps with audio has about 700,000), and the biggest index or sample table
# read (16 MiB: a million index entries, four million sample sizes).
_MAX_CHUNKS = 1 << 21
_MAX_TABLE = 16 << 20
_MAX_SAMPLES = 1 << 22
_BLOCK = 1 << 16

_AVI_MEDIA = {b"vids": "video", b"auds": "audio"}
_AVI_DATA = (b"dc", b"db", b"wb")
_MP4_MEDIA = {b"vide": "video", b"soun": "audio"}


class _Unsure(Exception):
    """The file is not one this module reads with confidence."""


def read_contents(path: Path) -> Contents | None:
    """
    What C{path} holds, or C{None} when it is not an AVI or MP4/MOV this
    module reads with confidence (the caller then has ffprobe count it).
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return _avi(f, size)
            if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return _mp4(f, size)
            if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] >= 0xE0):
                return read_mp3(path)
    except (_Unsure, OSError, struct.error, ValueError, OverflowError):
        pass
    return None


def _read(f: BinaryIO, at: int, n: int) -> bytes:
    f.seek(at)
    data = f.read(n)
    if len(data) != n:
        raise _Unsure("short read")
    return data


# AVI (RIFF)


def _chunks(
    f: BinaryIO, start: int, end: int, cut: bool = False
) -> list[tuple[bytes, int, int, bytes]]:
    """
    The chunks between C{start} and C{end}: (id, offset of the data, size,
    list type or b"").  They must fill the range exactly (the last one may
    lack its pad byte), except that in a C{cut} file the last may run past
    C{end}, where it is clipped.
    """
    found: list[tuple[bytes, int, int, bytes]] = []
    pos = start
    while pos < end:
        if len(found) >= _MAX_ITEMS:
            raise _Unsure("too many chunks")
        if end - pos < 12 and cut:
            break
        if end - pos < 8:
            raise _Unsure("a torn chunk")
        cid, size = struct.unpack("<4sI", _read(f, pos, 8))
        data = pos + 8
        if data + size > end:
            if not cut:
                raise _Unsure("a chunk runs past its parent")
            size = end - data
        kind = _read(f, data, 4) if cid in (b"LIST", b"RIFF") and size >= 4 else b""
        found.append((cid, data, size, kind))
        pos = data + size + (size & 1)
    if pos > end + 1:
        raise _Unsure("chunks overrun their parent")
    return found


class _AviStream:
    def __init__(self, kind: str, scale: int, rate: int, length: int, sample_size: int) -> None:
        self.kind = kind
        self.scale = scale
        self.rate = rate
        self.length = length
        self.sample_size = sample_size
        self.chunks = 0
        self.bytes = 0

    def held(self) -> Held:
        count = self.bytes // self.sample_size if self.sample_size else self.chunks
        held = min(count, self.length)
        unit = "frames" if not self.sample_size else "bytes" if self.sample_size == 1 else "samples"
        per = self.scale / self.rate
        return Held(self.kind, self.length, held, self.length * per, held * per, unit)


def _avi(f: BinaryIO, size: int) -> Contents:
    riff_end = 8 + struct.unpack("<I", _read(f, 4, 4))[0]
    if riff_end < 12:
        raise _Unsure("an empty RIFF chunk")
    after = riff_end + (riff_end & 1)
    if after + 4 <= size and _read(f, after, 4) == b"RIFF":
        # OpenDML: the file goes on in AVIX chunks, whose lengths this reader
        # does not add up.
        raise _Unsure("more than one RIFF chunk")
    # One RIFF chunk exactly as long as the file (or one pad byte short), or
    # else a file cut short (mencoder on a full disk leaves a RIFF size that
    # matches neither): its last chunk may then be torn, and what it holds
    # is counted from what is there.
    cut = riff_end not in (size, size - 1)
    top = _chunks(f, 12, min(riff_end, size), cut)
    hdrl = [c for c in top if c[0] == b"LIST" and c[3] == b"hdrl"]
    movi = [c for c in top if c[0] == b"LIST" and c[3] == b"movi"]
    if len(hdrl) != 1 or len(movi) != 1:
        raise _Unsure("no single header or movie list")
    _, data, length, _ = hdrl[0]
    lists = [c for c in _chunks(f, data + 4, data + length) if c[3] == b"strl"]
    if not lists or len(lists) > _MAX_STREAMS:
        raise _Unsure("no streams, or too many")
    streams: dict[int, _AviStream] = {}
    durations: list[float] = []
    for number, (_, sdata, slength, _) in enumerate(lists):
        strh = [c for c in _chunks(f, sdata + 4, sdata + slength) if c[0] == b"strh"]
        if len(strh) != 1 or strh[0][2] < 48:
            raise _Unsure("no stream header")
        fields = _read(f, strh[0][1], 48)
        scale, rate, start, frames = struct.unpack("<4I", fields[20:36])
        sample_size = struct.unpack("<I", fields[44:48])[0]
        kind = _AVI_MEDIA.get(fields[:4])
        if kind is None:
            continue
        if start != 0 or scale == 0 or rate == 0:
            # A delayed stream shifts libavformat's sums; let it do them.
            raise _Unsure("a delayed stream, or no rate")
        if sample_size == 0 and frames > 0:
            durations.append(frames * scale / rate)
        if frames > 0:
            streams[number] = _AviStream(kind, scale, rate, frames, sample_size)
    if not durations:
        raise _Unsure("no stream of known length")
    idx1 = [c for c in top if c[0] == b"idx1"]
    movi_at, movi_size = movi[0][1], movi[0][2]
    defects: list[str] = []
    if riff_end > size:
        defects.append(f"the file ends {riff_end - size} bytes short of its RIFF header's size")
    if len(idx1) == 1 and not (cut and idx1[0] is top[-1]):
        beyond = _count_index(f, size, movi_at, idx1[0][1], idx1[0][2], streams)
        if beyond:
            defects.append(f"{beyond} index entries point past the end of the file")
    else:
        _count_chunks(f, movi_at + 4, movi_at + movi_size, size, streams)
    return Contents(
        max(durations),
        tuple(s.held() for s in streams.values()),
        "; ".join(defects) or None,
    )


def _stream_of(cid: bytes, streams: dict[int, _AviStream]) -> _AviStream | None:
    if cid[2:] not in _AVI_DATA or not cid[:2].isdigit():
        return None
    return streams.get(int(cid[:2]))


def _count_index(
    f: BinaryIO, size: int, movi: int, at: int, length: int, streams: dict[int, _AviStream]
) -> int:
    """
    Count C{idx1}'s entries into C{streams}; the number of entries whose
    chunk lies (partly) past the end of the file, which count for nothing.
    """
    if length > _MAX_TABLE:
        raise _Unsure("an index too big to read")
    base: int | None = None
    beyond = 0
    last: tuple[bytes, int] | None = None
    for offset in range(at, at + length - length % 16, _BLOCK * 16):
        block = _read(f, offset, min(_BLOCK * 16, at + length - length % 16 - offset))
        for cid, _, where, n in struct.iter_unpack("<4sIII", block):
            stream = _stream_of(cid, streams)
            if stream is None:
                continue
            if base is None:
                # Offsets count from the movi list's type (the usual way) or
                # from the start of the file; the first entry tells which.
                base = _index_base(f, cid, where, movi)
            if base + where + 8 + n > size:
                beyond += 1
                continue
            stream.chunks += 1
            stream.bytes += n
            last = (cid, base + where)
    if last is not None and _read(f, last[1], 4) != last[0]:
        raise _Unsure("the index does not match the chunks")
    return beyond


def _index_base(f: BinaryIO, cid: bytes, where: int, movi: int) -> int:
    for base in (movi, 0):
        try:
            if _read(f, base + where, 4) == cid:
                return base
        except _Unsure:
            pass
    raise _Unsure("the index points at no chunk")


def _count_chunks(
    f: BinaryIO, start: int, end: int, size: int, streams: dict[int, _AviStream]
) -> None:
    """Count the chunks present in a movi list into C{streams}, up to the end of the file."""
    pos, seen, end = start, 0, min(end, size)
    while pos + 8 <= end:
        seen += 1
        if seen > _MAX_CHUNKS:
            raise _Unsure("too many chunks to count")
        cid, n = struct.unpack("<4sI", _read(f, pos, 8))
        if cid == b"LIST":
            pos += 12  # a 'rec ' list: its chunks follow
            continue
        if pos + 8 + n > size:
            break  # torn by the end of the file
        stream = _stream_of(cid, streams)
        if stream is not None:
            stream.chunks += 1
            stream.bytes += n
        pos += 8 + n + (n & 1)


# MP4, MOV (ISO base media)


def _boxes(f: BinaryIO, start: int, end: int, cut: bool = False) -> list[tuple[bytes, int, int]]:
    """
    The boxes between C{start} and C{end}: (type, offset of the body, body
    size).  They must fill the range exactly, except that with C{cut} a last
    C{mdat} may run past C{end}, where it is clipped.
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
        if size < header:
            raise _Unsure("a torn box")
        if pos + size > end:
            if not (cut and kind == b"mdat"):
                raise _Unsure("a box runs past its parent")
            size = end - pos
        found.append((kind, pos + header, size - header))
        pos += size
    return found


def _only(boxes: list[tuple[bytes, int, int]], kind: bytes) -> tuple[int, int]:
    matching = [(at, n) for k, at, n in boxes if k == kind]
    if len(matching) != 1:
        raise _Unsure(f"{len(matching)} {kind!r} boxes")
    return matching[0]


def _inside(f: BinaryIO, body: tuple[int, int]) -> list[tuple[bytes, int, int]]:
    at, n = body
    return _boxes(f, at, at + n)


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


def _mp4(f: BinaryIO, size: int) -> Contents:
    top = _boxes(f, 0, size, cut=True)
    kinds = {k for k, _, _ in top}
    if b"moof" in kinds or b"mdat" not in kinds:
        raise _Unsure("fragmented, or no media data")
    moov = _inside(f, _only(top, b"moov"))
    if any(k == b"mvex" for k, _, _ in moov):
        raise _Unsure("fragmented: libavformat sums the fragments")
    timescale, duration = _time_header(f, *_only(moov, b"mvhd"))
    streams: list[Held] = []
    outside = 0
    for kind, at, n in moov:
        if kind != b"trak":
            continue
        mdia = _inside(f, _only(_boxes(f, at, at + n), b"mdia"))
        hdlr_at, hdlr_n = _only(mdia, b"hdlr")
        if hdlr_n < 12:
            raise _Unsure("short hdlr")
        media = _MP4_MEDIA.get(_read(f, hdlr_at + 8, 4))
        if media is None:
            continue
        track_scale, _ = _time_header(f, *_only(mdia, b"mdhd"))
        stbl = _inside(f, _only(_inside(f, _only(mdia, b"minf")), b"stbl"))
        held, missing = _samples(f, stbl, size, media, track_scale)
        streams.append(held)
        outside += missing
    if not streams:
        raise _Unsure("no audio or video track")
    defect = f"{outside} samples lie past the end of the file" if outside else None
    return Contents(duration / timescale, tuple(streams), defect)


def _table(f: BinaryIO, stbl: list[tuple[bytes, int, int]], kind: bytes) -> bytes:
    at, n = _only(stbl, kind)
    if n > _MAX_TABLE or n < 8:
        raise _Unsure(f"a {kind!r} table too big, or too small")
    return _read(f, at, n)


def _entries(table: bytes, width: int, skip: int = 4) -> tuple[int, bytes]:
    """(count, entries) of a table whose count follows C{skip} bytes."""
    (count,) = struct.unpack_from(">I", table, skip)
    entries = table[skip + 4 : skip + 4 + count * width]
    if len(entries) != count * width:
        raise _Unsure("a table shorter than its count")
    return count, entries


def _samples(
    f: BinaryIO, stbl: list[tuple[bytes, int, int]], size: int, kind: str, scale: int
) -> tuple[Held, int]:
    """One track's samples: what the file holds of them, and how many lie past its end."""
    _, stts = _entries(_table(f, stbl, b"stts"), 8)
    runs = list(struct.iter_unpack(">II", stts))
    total = sum(n for n, _ in runs)
    stsz = _table(f, stbl, b"stsz")
    fixed, samples = struct.unpack_from(">II", stsz, 4)
    if fixed:
        sizes: tuple[int, ...] = ()
    else:
        _, table = _entries(stsz, 4, skip=8)
        sizes = struct.unpack(f">{samples}I", table)
    if samples != total or not 0 < samples <= _MAX_SAMPLES:
        raise _Unsure("the tables disagree on the number of samples, or state too many")
    _, stsc = _entries(_table(f, stbl, b"stsc"), 12)
    per_chunk = [(first, n) for first, n, _ in struct.iter_unpack(">III", stsc)]
    if b"co64" in {k for k, _, _ in stbl}:
        chunks, table = _entries(_table(f, stbl, b"co64"), 8)
        offsets = struct.unpack(f">{chunks}Q", table)
    else:
        chunks, table = _entries(_table(f, stbl, b"stco"), 4)
        offsets = struct.unpack(f">{chunks}I", table)
    if not per_chunk or per_chunk[0][0] != 1:
        raise _Unsure("odd sample-to-chunk table")
    # Which samples lie inside the file, a chunk at a time.
    held_ranges: list[tuple[int, int]] = []
    sample, run = 0, 0
    for chunk, offset in enumerate(offsets, start=1):
        while run + 1 < len(per_chunk) and per_chunk[run + 1][0] <= chunk:
            run += 1
        n = per_chunk[run][1]
        if n == 0 or sample + n > samples:
            raise _Unsure("chunks hold more samples than the tables")
        length = sum(sizes[sample : sample + n]) if sizes else fixed * n
        if offset + length <= size:
            held_ranges.append((sample, sample + n))
        sample += n
    if sample != samples:
        raise _Unsure("chunks hold fewer samples than the tables")
    stated = _presented(f, stbl, runs)
    held = sum(b - a for a, b in held_ranges)
    if held == samples:
        return Held(kind, samples, held, stated / scale, stated / scale, "samples"), 0
    held_time = _time_of(runs, held_ranges)
    return Held(kind, samples, held, stated / scale, held_time / scale, "samples"), samples - held


def _presented(f: BinaryIO, stbl: list[tuple[bytes, int, int]], runs: list[tuple[int, int]]) -> int:
    """
    When the track's last sample ends, in its timescale: its decoding times
    (C{stts}) moved by their composition offsets (C{ctts}), where a variable
    frame rate output puts a gap (a frame shown after a long pause).
    """
    decoded = sum(n * delta for n, delta in runs)
    if b"ctts" not in {k for k, _, _ in stbl}:
        return decoded
    table = _table(f, stbl, b"ctts")
    signed = table[0] == 1
    _, entries = _entries(table, 8)
    offsets = [
        (n, offset - (1 << 32) if signed and offset >= 1 << 31 else offset)
        for n, offset in struct.iter_unpack(">II", entries)
    ]
    end, at, run, left = decoded, 0, 0, runs[0][0] if runs else 0
    for count, offset in offsets:
        for _ in range(count):
            while left == 0 and run + 1 < len(runs):
                run += 1
                left = runs[run][0]
            if left == 0:
                raise _Unsure("ctts states more samples than stts")
            end = max(end, at + offset + runs[run][1])
            at += runs[run][1]
            left -= 1
    return end


def _time_of(runs: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> int:
    """The duration of the samples in C{ranges} (ascending), from C{stts}'s (count, delta) runs."""
    total, run, start = 0, 0, 0
    for a, b in ranges:
        while a < b:
            while start + runs[run][0] <= a:
                start += runs[run][0]
                run += 1
            end = min(b, start + runs[run][0])
            total += (end - a) * runs[run][1]
            a = end
    return total

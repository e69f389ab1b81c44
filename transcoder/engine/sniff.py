"""
Whether a file starts like media: the hint that lets an encoder start before
ffprobe has looked at its input.  Only inputs whose first bytes look like a
media container start their encoder before the probe; anything else (random
bytes, most of all) waits for its probe, so that garbage costs no encoder at
all.  Under a load test of random-byte uploads, the early encoders had taken
the status polls' p99 from 129 to 160 ms (measured).
"""

from __future__ import annotations

from pathlib import Path

# First bytes of the containers and streams the built-in profiles read.
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"FLV"),
    (4, b"ftyp"),  # MP4, MOV, 3GP, M4A
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"wide"),
    (4, b"free"),
    (0, b"RIFF"),  # AVI, WAV
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska, WebM
    (0, b"OggS"),
    (0, b"ID3"),  # MP3 with a tag
    (0, b"fLaC"),
    (0, b"\x00\x00\x01\xba"),  # MPEG program stream
    (0, b"\x00\x00\x01\xb3"),  # MPEG video
    (0, b"\x30\x26\xb2\x75"),  # ASF, WMV
)


def looks_like_media(path: Path) -> bool:
    """
    Whether C{path} starts like a media file: a hint for when to start the
    encoder, never a verdict (ffprobe gives that).
    """
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return True  # an MPEG audio frame: MP3 without a tag
    if head[:1] == b"\x47":
        return True  # an MPEG transport stream's sync byte
    return any(head[at : at + len(magic)] == magic for at, magic in _SIGNATURES)

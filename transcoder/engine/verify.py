"""
Whether an encoder's output holds what its header claims.

A header alone proves nothing: mencoder that hits a full disk exits 0 and
rewrites its AVI header with every frame it encoded (750), while the file
holds the frames written before the disk filled (292).  So an output is
accepted only when its frames or samples are in the file itself, counted
either in-process from the container's own index (L{transcoder.engine.container},
for AVI and MP4) or, for anything else, by ffprobe reading every packet
(L{from_probe}).  The second way is complete on its own: the first only
saves ffprobe's run where it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from transcoder.engine.probe import MediaInfo


@dataclass(frozen=True)
class Held:
    """One audio or video stream: what its header states, and what the file holds of it."""

    kind: str
    stated: int
    held: int
    seconds: float
    held_seconds: float
    unit: str = "frames"


@dataclass(frozen=True)
class Contents:
    """
    An output as read: the seconds its header states (as ffprobe's
    C{format.duration} would), each stream's count, and a fault found for
    certain (an index entry or sample past the end of the file), if any.
    """

    duration: float | None
    streams: tuple[Held, ...] = ()
    defect: str | None = None


def from_probe(info: MediaInfo) -> Contents:
    """
    The contents of a file as ffprobe C{-count_packets} read it: each stream's
    stated count is its C{nb_frames} (or, for video that states none, its
    duration times its frame rate), its held count the packets ffprobe read.
    Streams that state neither (most audio outside MP4) are not counted.
    """
    streams: list[Held] = []
    for s in info.streams:
        if s.codec_type not in ("audio", "video") or s.packets is None:
            continue
        seconds = s.duration if s.duration is not None else info.duration
        if seconds is None or seconds <= 0:
            continue
        if s.frames is not None and s.frames > 0 and s.duration is not None:
            stated = s.frames
        elif s.codec_type == "video" and s.frame_rate:
            stated = round(seconds * s.frame_rate)
        else:
            continue
        if stated <= 0:
            continue
        held = min(s.packets, stated)
        streams.append(Held(s.codec_type, stated, held, seconds, seconds * held / stated))
    return Contents(info.duration, tuple(streams))


def shortfall(contents: Contents, slack: float) -> str | None:
    """
    Why C{contents} does not hold what its header states, or C{None} when it
    does within C{slack} seconds.
    """
    worst = max(contents.streams, key=lambda s: s.seconds - s.held_seconds, default=None)
    if worst is not None and (
        worst.seconds - worst.held_seconds > slack or contents.defect is not None
    ):
        why = f" ({contents.defect})" if contents.defect else ""
        return (
            f"the output holds {worst.held} of the {worst.stated} {worst.kind} {worst.unit} "
            f"its header states ({worst.held_seconds:.2f} of {worst.seconds:.2f} s){why}"
        )
    if contents.defect is not None:
        return f"the output is damaged: {contents.defect}"
    if contents.streams and contents.duration is not None:
        held = max(s.held_seconds for s in contents.streams)
        if contents.duration - held > slack:
            return (
                f"the output's streams hold {held:.2f} s, "
                f"its header states {contents.duration:.2f} s"
            )
    return None

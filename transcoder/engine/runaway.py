"""
Inputs that claim more time than they hold, and encodes that outgrow their input.

A 30 KB Matroska file of 26 frames, the last stamped at 10 hours, is a valid
file that ffprobe calls 36000 s long.  An encoder told to keep a constant
frame rate fills the gap by repeating the 25th frame 900,000 times: minutes of
CPU at 320x240, the whole job timeout (and about 1 GB of memory) at 1080p
with a slow preset.  Three things bound it:

  - the built-in ffmpeg profile keeps the input's timestamps
    (C{-fps_mode vfr}), so nothing is repeated and such a file encodes in a
    fraction of a second;
  - an input longer than the server's C{--max-input-duration} fails at its
    probe (L{too_long});
  - an ffmpeg encode whose C{-progress} blocks show it outgrowing its input
    is stopped (L{runaway}).

The rule of L{runaway}, chosen so that it cannot stop a job that would
otherwise succeed, and then so that it misses as little as possible:

  1. The output position passes the input's duration by twice the profile's
     duration tolerance plus L{PAST_MARGIN} seconds.  Such an output fails
     the runner's duration check anyway; this only stops it hours sooner
     (an input whose header understates where its timestamps go).
  2. ffmpeg has invented more than L{DUP_FLOOR} frames, and more than
     L{DUP_RATIO} for every frame it read.  A constant-rate profile repeats
     frames to fill gaps: 1.5 per frame from 10 to 25 fps, a few thousand
     over an hour of a phone's variable rate.  Firing needs an input that
     averages one frame per 1000 output frames (40 s at 25 fps) over more
     than half an hour of invented video at 25 fps; the built-in profiles
     never invent frames at all.

What it cannot see: ffmpeg 5.1 prints no C{-progress} block while it repeats
one frame, so a single gap (the bomb above) shows up only when it is over.
Under a constant-rate profile that is bounded by C{--max-input-duration} and
the job's timeout, not by this rule.
"""

from __future__ import annotations

import math

from transcoder.engine.progress import FfmpegBlock

PAST_MARGIN = 10.0
DUP_FLOOR = 50_000
DUP_RATIO = 1000


def clock(seconds: float) -> str:
    """C{36000.04} as C{"10:00:00"}: whole seconds, rounded down."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def too_long(role: str, duration: float | None, limit: float | None) -> str | None:
    """Why input C{role} of C{duration} seconds is refused under C{limit}, or C{None}."""
    if duration is None or limit is None or duration <= limit:
        return None
    stated = clock(duration)
    if stated == clock(limit):
        # Only a fraction of a second over: show it, or the message says N is over N.
        stated = f"{duration:.2f} s"
    return (
        f"input {role} is {stated} long; "
        f"this server takes at most {clock(limit)} (--max-input-duration)"
    )


def runaway(
    block: FfmpegBlock,
    duration: float | None,
    tolerance: float,
    *,
    dup_floor: int = DUP_FLOOR,
    dup_ratio: int = DUP_RATIO,
) -> str | None:
    """
    Why an encode that reported C{block} has outgrown an input of
    C{duration} seconds (C{None}: unknown), or C{None} if it has not.
    C{tolerance} is the profile's duration tolerance (a fraction).
    """
    if (
        block.position is not None
        and duration is not None
        and math.isfinite(duration)
        and duration > 0
        and block.position > duration * (1 + 2 * tolerance) + PAST_MARGIN
    ):
        return (
            f"stopped: the output reached {block.position:.0f} s, "
            f"far past the input's {duration:.2f} s"
        )
    read = block.frames_read
    dups = block.dup_frames
    if read is not None and dups is not None and dups > max(dup_floor, dup_ratio * read):
        return (
            f"stopped: the encoder had repeated frames {dups} times for the {read} it read "
            f"(more than {dup_ratio} per frame); the input's timestamps claim far more "
            "time than its frames fill"
        )
    return None

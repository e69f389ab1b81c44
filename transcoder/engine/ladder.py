"""
The renditions of an HLS ladder: which rungs a job gets, and the ffmpeg
arguments that make them (the C{{ladder}} placeholder of a profile).

A client picks rungs by name (C{rungs=360p,720p}); a rung taller than the
source is left out, so nothing is ever scaled up.  When every rung picked is
taller than the source, the job gets one rendition, at the source's height
(rounded down to even), rather than none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from transcoder.core.profiles import ParamValue, Profile
from transcoder.engine.probe import MediaInfo


@dataclass(frozen=True)
class Rung:
    name: str
    height: int
    # kbit/s
    video_bitrate: int
    audio_bitrate: int


RUNGS: dict[str, Rung] = {
    r.name: r
    for r in (
        Rung("240p", 240, 400, 64),
        Rung("360p", 360, 800, 96),
        Rung("480p", 480, 1400, 128),
        Rung("720p", 720, 2800, 128),
        Rung("1080p", 1080, 5000, 192),
        Rung("1440p", 1440, 9000, 192),
        Rung("2160p", 2160, 16000, 192),
    )
}


def pick_rungs(names: str, source_height: int | None) -> list[Rung]:
    """
    The rungs named in C{names} (comma-separated; unknown names ignored,
    the profile's pattern keeps them out), lowest first, without those
    taller than C{source_height}.
    """
    picked = sorted({RUNGS[n] for n in names.split(",") if n in RUNGS}, key=lambda r: r.height)
    if source_height is None or not picked:
        return picked
    kept = [r for r in picked if r.height <= source_height]
    if kept:
        return kept
    low = picked[0]
    height = max(2, source_height - source_height % 2)
    return [Rung(f"{height}p", height, low.video_bitrate, low.audio_bitrate)]


def ladder_args(rungs: list[Rung], has_audio: bool) -> list[str]:
    """
    ffmpeg arguments mapping the first video stream (and the first audio
    stream, when there is one) into one scaled rendition per rung, with the
    C{-var_stream_map} that names each rendition (C{%v} in the HLS muxer's
    paths) after its rung.
    """
    n = len(rungs)
    splits = "".join(f"[s{i}]" for i in range(n))
    graph = [f"[0:v:0]split={n}{splits}"]
    graph += [
        f"[s{i}]scale=w=-2:h='trunc(min(ih,{r.height})/2)*2'[v{i}]" for i, r in enumerate(rungs)
    ]
    args = ["-filter_complex", ";".join(graph)]
    streams = []
    for i, r in enumerate(rungs):
        args += ["-map", f"[v{i}]", f"-b:v:{i}", f"{r.video_bitrate}k"]
        args += [f"-maxrate:v:{i}", f"{r.video_bitrate * 3 // 2}k"]
        args += [f"-bufsize:v:{i}", f"{r.video_bitrate * 2}k"]
        if has_audio:
            args += ["-map", "0:a:0", f"-b:a:{i}", f"{r.audio_bitrate}k"]
            streams.append(f"v:{i},a:{i},name:{r.name}")
        else:
            streams.append(f"v:{i},name:{r.name}")
    return [*args, "-var_stream_map", " ".join(streams)]


def probed_values(
    profile: Profile, params: Mapping[str, ParamValue], probed: list[MediaInfo] | str | None
) -> dict[str, str | list[str]]:
    """The placeholders a probe-first profile's argv takes from its first input's probe."""
    if not profile.probe_first or not isinstance(probed, list):
        return {}
    first = probed[0]
    rungs = pick_rungs(str(params.get("rungs", "")), first.height)
    return {
        "input_duration": f"{first.duration or 0:.3f}",
        "input_height": str(first.height or 0),
        "ladder": ladder_args(rungs, bool(first.codecs("audio"))),
    }

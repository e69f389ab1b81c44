"""
Checking the outputs of a profile that writes a directory, and keeping them.

A job with several outputs succeeds only when every file the encoder left is
one the profile declares (L{transcoder.core.outputs}), each declared output
has as many files as it says, and each file passes its check:

  - C{media}: as a one-output job's result (L{transcoder.engine.outcome}):
    media, holding what its header states, its duration the input's;
  - C{hls}: a playlist that parses (C{#EXTM3U}); a master playlist's
    renditions are outputs of the job, and a rendition's segments are too,
    their C{#EXTINF} durations summing to the input's duration;
  - C{image}: ffmpeg decodes a picture from it (all of a job's images in one
    run, L{transcoder.engine.images});
  - C{none}: listed only (an HLS segment is checked through its playlist).

Then each is hashed and the directory renamed from C{outputs.partial[.N]} to
C{outputs[.N]}.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.jobs import OutputFile
from transcoder.core.outputs import OutputSpec, is_output_name
from transcoder.core.profiles import ParamValue, Profile
from transcoder.engine.images import Picture
from transcoder.engine.outcome import (
    HeaderReader,
    Wait,
    accept_output,
    check_contents,
    with_detail,
)
from transcoder.engine.probe import MediaInfo, NotMediaError
from transcoder.engine.settings import Tools
from transcoder.engine.verify import Contents, from_probe

_log = Logger()

# Durations are checked relatively, but never tighter than a few frames.
_MIN_SLACK = 0.1
# The most of a playlist read: a day of 2 s segments is about 2 MB.
_MAX_PLAYLIST = 8 * 1024 * 1024

ProbeFile = Callable[[Path], Deferred[MediaInfo]]
DecodeFile = Callable[[Sequence[Path]], Deferred[list[Picture]]]


def partial_path(job_dir: Path, profile: Profile, attempt: int) -> Path:
    """
    Where an attempt's encoder writes: C{result.partial.[<attempt>.]<ext>}, or
    for several outputs the directory C{outputs.partial[.<attempt>]}.  Each
    attempt (with several nodes) writes under its own names: a node that lost
    the job never writes over the one that took it over.
    """
    if profile.multi_output:
        return job_dir / ("outputs.partial" + (f".{attempt}" if attempt else ""))
    run = f"{attempt}." if attempt else ""
    return job_dir / f"result.partial.{run}{profile.output_extension}"


async def accept_any(
    partial: Path,
    profile: Profile,
    params: Mapping[str, ParamValue],
    duration: float | None,
    hashing: Deferred[str],
    *,
    tools: Tools,
    reactor: IReactorProcess,
    hash_file: Callable[[Path], Deferred[str]],
    wait: Wait,
    last: str | None,
) -> OutputFile | list[OutputFile] | str:
    """L{accept_output} for a one-output profile, L{accept_outputs} for the others."""
    count = functools.partial(tools.count, reactor)
    if not profile.multi_output:
        return await accept_output(
            partial,
            profile,
            duration,
            hashing,
            read_header=tools.read_header,
            count=count,
            wait=wait,
            last=last,
        )
    return await accept_outputs(
        partial,
        profile,
        params,
        duration,
        read_header=tools.read_header,
        count=count,
        decode=functools.partial(tools.decode, reactor),
        hash_file=hash_file,
        wait=wait,
        last=last,
    )


def final_dir(partial: Path) -> Path:
    """C{outputs.partial[.N]} becomes C{outputs[.N]}."""
    return partial.with_name(partial.name.replace("outputs.partial", "outputs", 1))


def list_outputs(root: Path) -> list[str]:
    """Every regular file under C{root}, as C{/}-separated names relative to it, sorted."""
    names: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        names += [str(rel / f) if str(rel) != "." else f for f in files]
    return sorted(names)


def match_outputs(
    names: list[str], specs: tuple[OutputSpec, ...], params: Mapping[str, ParamValue]
) -> dict[str, OutputSpec] | str:
    """Each file's declared output, or why the files are not what the profile declares."""
    found: dict[str, OutputSpec] = {}
    for name in names:
        spec = next((s for s in specs if s.matches(name)), None)
        if spec is None or not is_output_name(name):
            return f"the encoder wrote {name!r}, which its profile does not declare"
        found[name] = spec
    for spec in specs:
        n = sum(1 for s in found.values() if s is spec)
        least, most = spec.expected(params)
        if n < least or (most is not None and n > most):
            wanted = str(least) if least == most else f"at least {least}"
            return f"output {spec.name}: {n} files, not {wanted}"
    return found


def parse_playlist(text: str) -> tuple[list[str], list[tuple[float, str]], bool] | str:
    """
    A playlist's rendition URIs (a master's C{#EXT-X-STREAM-INF} lines), its
    segments (C{#EXTINF} seconds and URI), and whether it ends
    (C{#EXT-X-ENDLIST}); or why it is not a playlist.
    """
    lines = [line.strip() for line in text.splitlines()]
    if not lines or lines[0] != "#EXTM3U":
        return "does not start with #EXTM3U"
    variants: list[str] = []
    segments: list[tuple[float, str]] = []
    pending: str | float | None = None
    ended = False
    for line in lines[1:]:
        if not line:
            continue
        if line.startswith("#EXT-X-STREAM-INF:"):
            pending = "variant"
        elif line.startswith("#EXTINF:"):
            try:
                pending = float(line[len("#EXTINF:") :].split(",", 1)[0])
            except ValueError:
                return f"bad line {line[:80]!r}"
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif line.startswith("#"):
            continue
        elif pending == "variant":
            variants.append(line)
            pending = None
        elif isinstance(pending, float):
            segments.append((pending, line))
            pending = None
        else:
            return f"URI {line[:80]!r} without #EXTINF or #EXT-X-STREAM-INF"
    if not variants and not segments:
        return "names no rendition and no segment"
    return variants, segments, ended


def _resolve(name: str, uri: str) -> str | None:
    """The output C{uri} names, relative to the playlist C{name}; None outside the directory."""
    if "://" in uri or uri.startswith("/") or "?" in uri:
        return None
    parts: list[str] = list(PurePosixPath(name).parent.parts)
    for part in uri.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


def check_playlist(
    root: Path, name: str, names: set[str], duration: float | None, tolerance: float
) -> str | None:
    """Why the playlist C{name} under C{root} is not a whole HLS encode of the input, or None."""
    path = root / name
    if path.stat().st_size > _MAX_PLAYLIST:
        return f"playlist {name} is over {_MAX_PLAYLIST} bytes"
    parsed = parse_playlist(path.read_text("utf-8", errors="replace"))
    if isinstance(parsed, str):
        return f"playlist {name} {parsed}"
    variants, segments, ended = parsed
    for uri in variants:
        target = _resolve(name, uri)
        if target is None or target not in names:
            return f"playlist {name} names {uri!r}, which the job did not make"
    if not segments:
        return None
    for _seconds, uri in segments:
        target = _resolve(name, uri)
        if target is None or target not in names:
            return f"playlist {name} names segment {uri!r}, which the job did not make"
    if not ended:
        return f"playlist {name} has no #EXT-X-ENDLIST: the encode stopped early"
    total = sum(seconds for seconds, _ in segments)
    if duration is not None and abs(total - duration) > max(duration * tolerance, _MIN_SLACK):
        return f"playlist {name}: segments last {total:.2f} s, the input lasts {duration:.2f} s"
    return None


async def _check_media(
    path: Path,
    name: str,
    duration: float | None,
    tolerance: float,
    read_header: HeaderReader,
    count: ProbeFile,
    wait: Wait,
) -> str | None:
    try:
        contents: Contents | None = read_header(path)
    except Exception:
        _log.failure("reading the header of output {name}", name=name)
        contents = None
    if contents is None:
        try:
            info = await wait(maybeDeferred(count, path))
        except CancelledError:
            raise
        except NotMediaError:
            return f"output {name} is not a media file"
        except Exception as e:
            _log.failure("probing output {name}", Failure(), name=name)
            return f"could not check output {name}: {e}"
        contents = from_probe(info)
    refused = check_contents(contents, duration, tolerance)
    return None if refused is None else f"output {name}: {refused}"


async def _check_images(
    partial: Path, names: list[str], decode: DecodeFile, wait: Wait
) -> str | None:
    if not names:
        return None
    paths = [partial / name for name in names]
    try:
        pictures = await wait(maybeDeferred(decode, paths))
    except CancelledError:
        raise
    except NotMediaError:
        pictures = None
    except Exception as e:
        _log.failure("decoding outputs {names}", Failure(), names=names)
        return f"could not check outputs {', '.join(names)}: {e}"
    if pictures is not None and all(
        _refusal(name, p) is None for name, p in zip(names, pictures, strict=True)
    ):
        return None
    # Decode them one by one to name the one at fault.
    for name, path in zip(names, paths, strict=True):
        try:
            alone = await wait(maybeDeferred(decode, [path]))
        except CancelledError:
            raise
        except NotMediaError:
            return f"output {name} is not an image ffmpeg can decode"
        except Exception as e:
            _log.failure("decoding output {name}", Failure(), name=name)
            return f"could not check output {name}: {e}"
        refused = _refusal(name, alone[0])
        if refused is not None:
            return refused
    return f"outputs {', '.join(names)} could not be decoded together"


def _refusal(name: str, picture: Picture) -> str | None:
    if not picture.width or not picture.height:
        return f"output {name} is not an image ffmpeg can decode"
    if picture.frames < 1:
        return f"output {name}: ffmpeg decoded no picture from it"
    return None


async def accept_outputs(
    partial: Path,
    profile: Profile,
    params: Mapping[str, ParamValue],
    duration: float | None,
    *,
    read_header: HeaderReader,
    count: ProbeFile,
    decode: DecodeFile,
    hash_file: Callable[[Path], Deferred[str]],
    wait: Wait,
    last: str | None,
) -> list[OutputFile] | str:
    """
    Check every output in the directory C{partial} and, if all pass, make
    them the job's outputs (L{final_dir}); or say why the job fails.

    @param decode: decoding images (L{transcoder.engine.images}), all in one call.
    @param hash_file: the SHA-256 of a file, off the reactor thread.
    """
    names = list_outputs(partial)
    if not names:
        return with_detail("the encoder wrote no output", last)
    found = match_outputs(names, profile.outputs, params)
    if isinstance(found, str):
        return found
    every = set(names)
    tolerance = profile.duration_tolerance
    durations: dict[str, float | None] = {}
    images: list[str] = []
    for name, spec in found.items():
        path = partial / name
        problem: str | None = None
        if spec.check == "media":
            problem = await _check_media(path, name, duration, tolerance, read_header, count, wait)
            durations[name] = duration
        elif spec.check == "hls":
            problem = check_playlist(partial, name, every, duration, tolerance)
        elif spec.check == "image":
            images.append(name)
        if problem is not None:
            return problem
    problem = await _check_images(partial, images, decode, wait)
    if problem is not None:
        return problem
    digests = {name: await wait(hash_file(partial / name)) for name in names}
    final = final_dir(partial)
    os.replace(partial, final)
    return [
        OutputFile(
            size=(final / name).stat().st_size,
            sha256=digests[name],
            media_type=spec.media_type,
            path=f"{final.name}/{name}",
            duration=durations.get(name),
            name=name,
        )
        for name, spec in found.items()
    ]

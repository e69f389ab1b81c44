"""
How an execution ended, and the checks that turn an encoder's output into a
result.

An encoder's exit status alone proves little: mencoder exits 0 after "encoding"
garbage it took for raw DV, and leaves a valid but truncated AVI when stopped.
So an output counts only if it is media, its duration matches the input's,
and the file itself holds the frames its header states
(L{transcoder.engine.verify}): mencoder on a full disk exits 0 with a header
claiming 750 frames over a file holding 292.

What the output holds is read in-process from its container's own tables
(L{transcoder.engine.container}) when it is an AVI or MP4 the reader is sure of;
anything else is counted by ffprobe reading every packet.  An ffprobe run
there would be the one cost of the service that nothing overlaps: the output
is final only once the encoder has exited.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.jobs import JobState, OutputFile
from transcoder.core.profiles import Profile
from transcoder.engine.probe import MediaInfo, NotMediaError
from transcoder.engine.verify import Contents, from_probe, shortfall

# Durations are checked relatively, but never tighter than a few frames, so a
# very short input is not failed over one frame of rounding.
_MIN_DURATION_SLACK = 0.1

_log = Logger()
_T = TypeVar("_T")

HeaderReader = Callable[[Path], Contents | None]


class Wait(Protocol):
    """Waits for C{d}; raises L{CancelledError} if the execution is told to stop meanwhile."""

    def __call__(self, d: Deferred[_T], /) -> Coroutine[Any, Any, _T]: ...


@dataclass
class Outcome:
    """How an execution ended; C{error} says why when C{state} is FAILED."""

    state: JobState
    output: OutputFile | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None
    # A multi-output profile's outputs (its output stays None).
    outputs: list[OutputFile] = field(default_factory=list)
    # What the probes learnt of each input, by role, once they answered.
    inputs_media: dict[str, dict[str, Any]] | None = None


def with_detail(message: str, detail: str | None) -> str:
    return f"{message}: {detail}" if detail else message


def check_contents(contents: Contents, duration: float | None, tolerance: float) -> str | None:
    """
    Why an output holding C{contents} is not the encode of an input lasting
    C{duration} seconds (C{None}: unknown), or C{None} if it is;
    C{tolerance} is the profile's relative slack on durations.
    """
    stated = contents.duration
    if duration is not None:
        slack = max(duration * tolerance, _MIN_DURATION_SLACK)
        if stated is None:
            return f"output duration unknown; input duration is {duration:.2f} s"
        if abs(stated - duration) > slack:
            return f"output duration {stated:.2f} s does not match input duration {duration:.2f} s"
    else:
        slack = max((stated or 0.0) * tolerance, _MIN_DURATION_SLACK)
    return shortfall(contents, slack)


def keep_result(partial: Path, profile: Profile, digest: str, duration: float | None) -> OutputFile:
    """
    Make the checked output at C{partial} the job's result, beside it:
    C{result.partial.[<attempt>.]<ext>} becomes C{result.[<attempt>.]<ext>}.
    """
    final = partial.parent / partial.name.replace("result.partial.", "result.", 1)
    os.replace(partial, final)
    return OutputFile(
        size=final.stat().st_size,
        sha256=digest,
        media_type=profile.media_type,
        path=final.name,
        duration=duration,
    )


async def accept_output(
    partial: Path,
    profile: Profile,
    duration: float | None,
    hashing: Deferred[str],
    *,
    read_header: HeaderReader,
    count: Callable[[Path], Deferred[MediaInfo]],
    wait: Wait,
    last: str | None,
) -> OutputFile | str:
    """
    Check the encoder's output at C{partial} against an input lasting
    C{duration} seconds and, if it passes, make it the job's result; or say
    why it does not pass.

    @param hashing: the output's SHA-256 to come.
    @param read_header: what the output holds by its container's tables, or
        C{None} to have C{count} read every packet instead.
    @param last: the encoder's last words, quoted when its output is not media.
    """
    try:
        # A few small reads of a file just written, in the page cache.
        contents: Contents | None = read_header(partial)
    except Exception:
        _log.failure("reading the output's header")
        contents = None
    if contents is None:
        try:
            info = await wait(maybeDeferred(count, partial))
        except CancelledError:
            raise
        except NotMediaError:
            return with_detail("the encoder's output is not a media file", last)
        except Exception as e:
            _log.failure("probing the output", Failure())
            return f"could not check the output: {e}"
        contents = from_probe(info)
    refused = check_contents(contents, duration, profile.duration_tolerance)
    if refused is not None:
        return refused
    digest = await wait(hashing)
    return keep_result(partial, profile, digest, contents.duration)

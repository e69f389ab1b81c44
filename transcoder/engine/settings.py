"""
What an execution of L{transcoder.engine.runner} is given besides its job:
the tools it reads files and signals processes with (injectable for tests),
and the limits it keeps to.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transcoder.engine.container import read_contents
from transcoder.engine.digest import HashFunction
from transcoder.engine.disk import DISK_RESERVE, FreeSpace, free_space
from transcoder.engine.images import DecodeImages, decode_images
from transcoder.engine.inputs import ProbeFunction
from transcoder.engine.outcome import HeaderReader
from transcoder.engine.probe import probe as ffprobe
from transcoder.engine.probe import probe_counting
from transcoder.engine.process import LOG_LIMIT, KillGroup
from transcoder.engine.sniff import looks_like_media


@dataclass(frozen=True)
class Tools:
    """
    @ivar probe: reads a media file (an input).
    @ivar count: reads a media file counting its packets (for the output).
    @ivar decode: decodes a multi-output job's images, all in one run.
    @ivar hash_file: the SHA-256 of a file as hex; C{None}: computed in the
        reactor's thread pool.
    @ivar killpg: signals a process group.
    @ivar sniff: whether an input looks like media by its first bytes; if
        any does not, the encoder waits for the probes.
    @ivar read_header: what the output holds as its container's own tables
        say (L{transcoder.engine.container}), or C{None} to have C{count} read it
        instead.
    @ivar disk_free: the bytes free on a path's filesystem, looked at every
        L{transcoder.engine.disk.DISK_WATCH} seconds.
    """

    probe: ProbeFunction = ffprobe
    count: ProbeFunction = probe_counting
    decode: DecodeImages = decode_images
    hash_file: HashFunction | None = None
    killpg: KillGroup = os.killpg
    sniff: Callable[[Path], bool] = looks_like_media
    read_header: HeaderReader = read_contents
    disk_free: FreeSpace = free_space


@dataclass(frozen=True)
class Limits:
    """
    @ivar timeout: seconds from the start (probing included) after which the
        encoder is stopped and the job fails; C{None} for no limit.
    @ivar kill_grace: seconds between TERM and KILL when stopping.
    @ivar log_limit: bytes of output kept in the log.
    @ivar disk_reserve: bytes that must stay free on the job directory's
        filesystem while the encoder runs and when it exits; below that the
        encoder's process group is stopped and the job fails as the disk
        being full, as it does when the encoder says "No space left on device".
    @ivar max_input_duration: seconds; an input that probes longer fails the
        job as a rejected input (see L{transcoder.engine.runaway}); C{None}: no limit.
    """

    timeout: float | None = None
    kill_grace: float = 5.0
    log_limit: int = LOG_LIMIT
    disk_reserve: int = DISK_RESERVE
    max_input_duration: float | None = None

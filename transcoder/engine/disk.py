"""
The free space of an encode's output filesystem, looked at while the encoder
runs: an encoder that hit ENOSPC may still exit 0 (mencoder does, its header
claiming every frame it encoded), so running short of the reserve stops it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

# Bytes that must stay free on the output's filesystem while an encoder runs,
# and seconds between looks.
DISK_RESERVE = 1024 * 1024
DISK_WATCH = 0.5

_log = Logger()

FreeSpace = Callable[[Path], int]


def free_space(path: Path) -> int:
    """Bytes an unprivileged writer may still use on C{path}'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskWatch:
    """
    Looks at the free space of C{path}'s filesystem every L{DISK_WATCH}
    seconds from L{start} while C{wanted()}, and calls C{on_short} once it
    is below C{reserve} bytes.

    @ivar free: the bytes free at the last look, or C{None} before one.
    """

    def __init__(
        self,
        clock: IReactorTime,
        path: Path,
        reserve: int,
        disk_free: FreeSpace,
        wanted: Callable[[], bool],
        on_short: Callable[[], None],
    ) -> None:
        self.free: int | None = None
        self._clock = clock
        self._path = path
        self._reserve = reserve
        self._disk_free = disk_free
        self._wanted = wanted
        self._on_short = on_short
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self._timer = self._clock.callLater(DISK_WATCH, self._look)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def short(self) -> bool:
        """Whether the filesystem has less than the reserve free."""
        try:
            self.free = self._disk_free(self._path)
        except OSError as e:
            _log.warn("cannot read the free space of {path}: {error}", path=self._path, error=e)
            return False
        return self.free < self._reserve

    def _look(self) -> None:
        self._timer = None
        if not self._wanted():
            return
        if self.short():
            self._on_short()
        else:
            self._timer = self._clock.callLater(DISK_WATCH, self._look)

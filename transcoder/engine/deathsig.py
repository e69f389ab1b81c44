"""
Children that die with the node: every tool is started through util-linux's
C{setpriv --pdeathsig KILL}, which sets the kernel's parent-death signal
(C{PR_SET_PDEATHSIG}) and then execs the tool in place.  When the node
process ends, even by C{kill -9}, the kernel sends each such child SIGKILL,
so a job run again (here or on another node) never competes with an orphan.

Why this holds:
  - setpriv execs in place, so the pid Twisted returns stays the tool's own;
  - the signal survives C{execve} of binaries that are not set-user-ID or
    set-group-ID and have no file capabilities (none of our tools are);
  - it fires when the thread that forked ends: Twisted forks from the
    reactor thread, which lives as long as the process;
  - it is not inherited across C{fork}: a tool's own children are not
    covered (mencoder and ffmpeg start none), which is why start-up
    recovery (L{transcoder.core.recovery}) still stops leftover groups.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from twisted.logger import Logger

_log = Logger()

SETPRIV = "setpriv"
DEATH_SIGNAL = "KILL"


def find_setpriv(search_path: str) -> str | None:
    """The path of C{setpriv} on C{search_path} (a C{PATH} value), or None."""
    return shutil.which(SETPRIV, path=search_path)


def tied_to_node(executable: str, argv: Sequence[str], search_path: str) -> tuple[str, list[str]]:
    """
    The executable and argv for C{spawnProcess} that run C{executable} with
    C{argv[1:]} as a child that gets SIGKILL when this process ends.  Where
    C{setpriv} is missing they are C{executable} and C{argv} unchanged
    (L{warn_if_unavailable} says so once, at start).

    setpriv looks its program up with C{execvp}; giving it the full path of
    C{executable} runs exactly what the caller found.
    """
    setpriv = find_setpriv(search_path)
    if setpriv is None:
        return executable, list(argv)
    return setpriv, [SETPRIV, "--pdeathsig", DEATH_SIGNAL, executable, *argv[1:]]


def warn_if_unavailable(search_path: str) -> bool:
    """
    Log a warning if C{setpriv} is not on C{search_path}: encoders then
    outlive a killed node until its next start's recovery.  Whether it is
    available.
    """
    if find_setpriv(search_path) is not None:
        return True
    _log.warn(
        "setpriv (util-linux) is not on PATH: encoders and probes will not die"
        " with this process if it is killed; a restart stops leftover encoders"
    )
    return False

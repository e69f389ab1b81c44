"""
What start-up does after a crash, outside the registry's own state: removing
the files no stored job owns, and stopping the encoders and probes a killed
server left running, found through C{/proc}.

Encoders run in sessions of their own, so they outlive a server killed with
SIGKILL; a job they belong to is about to run again, and two encoders must
not write the same job's result.  Start-up is the only time this runs, so
short blocking waits are fine.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from transcoder.core.files import remove

_log = Logger()

# How long start-up waits for a leftover encoder to obey SIGTERM before SIGKILL.
_RECOVERY_GRACE = 2.0


def remove_unowned(jobs_dir: Path, known: Collection[str]) -> None:
    """Remove every entry of C{jobs_dir} whose name is not one of the C{known} job ids."""
    for entry in jobs_dir.iterdir():
        if entry.name not in known:
            _log.info("removing {path}: no stored job owns it", path=str(entry))
            remove(entry)


@dataclass(frozen=True)
class Process:
    """A running process, as C{/proc} showed it."""

    pid: int
    cwd: str | None
    argv: list[bytes]


def processes() -> list[Process]:
    """Every process but this one, with its working directory and argv where readable."""
    found = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd: str | None = os.readlink(entry / "cwd")
        except OSError:
            cwd = None
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            argv = []
        found.append(Process(int(entry.name), cwd, argv))
    return found


def stop_leftovers(job_dir: Path, job_id: str, pid: int | None, running: list[Process]) -> None:
    """
    Stop the encoders and probes of the job in C{job_dir} that a previous
    server left in C{running}.

    @param pid: the encoder's process group as the store recorded it, if it did.
    """
    # The pid reaches the store just after the spawn (and RUNNING just
    # before it), so a server killed in between left an encoder that
    # only its working directory tells of, even for a job stored QUEUED.
    groups = set(_groups_working_in(job_dir, running))
    if pid is not None:
        groups.add(pid)
    for pgid in sorted(groups):
        _stop_leftover_encoder(pgid, job_dir, job_id)
    _stop_leftover_probes(job_dir, job_id, running)


def _stop_leftover_encoder(pid: int, job_dir: Path, job_id: str) -> None:
    """Stop the process group C{pid} if it is still the encoder of the job in C{job_dir}."""
    if not _is_encoder_of(pid, job_dir):
        return
    _log.warn("stopping leftover encoder {pid} of job {job_id}", pid=pid, job_id=job_id)
    for sig, wait in ((signal.SIGTERM, _RECOVERY_GRACE), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            _log.error("not allowed to stop leftover encoder {pid}", pid=pid)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.02)
    _log.error("leftover encoder {pid} of job {job_id} survived SIGKILL", pid=pid, job_id=job_id)


def _stop_leftover_probes(job_dir: Path, job_id: str, running: list[Process]) -> None:
    """
    Kill the ffprobe runs a killed server left on the job's inputs.  They run
    in the server's directory and process group (which may be this server's
    too, when one shell started both), so they are found by the C{file:}
    argument that names an input, and killed one by one.  A probe has no
    children and nothing to save.
    """
    # As probe.probe names it (absolute), and as the kernel would (resolved).
    targets = {b"file:" + os.fsencode(p) + b"/" for p in (job_dir.absolute(), job_dir.resolve())}
    for process in running:
        if any(arg.startswith(t) for arg in process.argv for t in targets):
            _log.warn(
                "stopping leftover probe {pid} of job {job_id}", pid=process.pid, job_id=job_id
            )
            try:
                os.kill(process.pid, signal.SIGKILL)
            except OSError:
                pass


def _groups_working_in(job_dir: Path, running: list[Process]) -> list[int]:
    """Process groups (other than ours) with a process whose working directory is C{job_dir}."""
    target = os.path.realpath(job_dir)
    ours = os.getpgrp()
    found: set[int] = set()
    for process in running:
        if process.cwd != target:
            continue
        try:
            pgid = os.getpgid(process.pid)
        except OSError:
            continue
        if pgid != ours:
            found.add(pgid)
    return sorted(found)


def _is_encoder_of(pid: int, job_dir: Path) -> bool:
    """Whether process C{pid} works in C{job_dir} or names it: a pid alone may have been reused."""
    proc = Path("/proc") / str(pid)
    target = os.path.realpath(job_dir)
    try:
        if os.readlink(proc / "cwd") == target:
            return True
    except OSError:
        pass
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = os.fsencode(target)
    return any(arg == name or arg.startswith(name + b"/") for arg in argv)


def _group_alive(pgid: int) -> bool:
    """Whether any process of group C{pgid} still runs (zombies only wait to be reaped)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False

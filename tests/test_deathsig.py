"""
Children die with their node (issue 16): encoders and probes are started
through C{setpriv --pdeathsig KILL}, so a node killed with SIGKILL takes them
with it instead of leaving them to its next start's recovery.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from serverproc import serve, wait_for
from test_recovery import alive, encoders, proc_stat, subreaper, upload
from twisted.internet import reactor
from twisted.logger import LogEvent, globalLogPublisher

from transcoder.engine.deathsig import tied_to_node, warn_if_unavailable
from transcoder.engine.probe import tool_env
from transcoder.engine.process import LOG_LIMIT, EncoderProtocol, exit_status, spawn_encoder

__all__ = ["subreaper"]  # a fixture, used by name

# An encoder that never ends by itself and ignores SIGTERM, as test_faults' hang.
HANG = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(1e9)
"""
PROFILES = f"""
[hang-forever]
executable = {json.dumps(sys.executable)}
argv = ["-c", {json.dumps(HANG)}, "{{file}}", "{{output}}"]
"""
# What a spawned process reports of itself: pid, process group, session and
# parent-death signal (PR_GET_PDEATHSIG = 2).
SELF_REPORT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
sig = ctypes.c_int()
assert libc.prctl(2, ctypes.byref(sig), 0, 0, 0) == 0
print(os.getpid(), os.getpgid(0), os.getsid(0), sig.value)
"""
# A node reduced to its probe: ffprobe on a FIFO nobody writes to blocks in
# open() until it is killed.
PROBING_NODE = """
import sys
from pathlib import Path
from twisted.internet import reactor
from transcoder.engine.probe import probe
reactor.callWhenRunning(lambda: probe(reactor, Path(sys.argv[1]), timeout=600))
reactor.run()
"""
# The issue asks for the encoder to be gone within 3 s of its node's death.
GONE_WITHIN = 3.0


def test_tied_to_node_puts_setpriv_in_front(tmp_path: Path) -> None:
    """With setpriv on PATH the argv becomes C{setpriv --pdeathsig KILL <full path> <args>}; without it, argv is unchanged."""
    path = tool_env()["PATH"]
    executable, argv = tied_to_node("/usr/bin/ffprobe", ["ffprobe", "-v", "error"], path)
    assert os.path.basename(executable) == "setpriv"
    assert argv == ["setpriv", "--pdeathsig", "KILL", "/usr/bin/ffprobe", "-v", "error"]
    empty = str(tmp_path)
    assert tied_to_node("/usr/bin/ffprobe", ["ffprobe", "-v"], empty) == (
        "/usr/bin/ffprobe",
        ["ffprobe", "-v"],
    )


def test_warning_when_setpriv_is_missing(tmp_path: Path) -> None:
    """Without setpriv on PATH a warning says that children will outlive a killed node; with it, nothing is logged."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert warn_if_unavailable(tool_env()["PATH"])
        assert events == []
        assert not warn_if_unavailable(str(tmp_path))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = events
    assert "setpriv" in event["log_format"] and "restart" in event["log_format"]


@pytest_twisted.ensureDeferred
async def test_spawned_encoder_is_its_own_group_with_the_death_signal(tmp_path: Path) -> None:
    """
    Through setpriv and setsid, both exec'd in place, the pid Twisted gives
    the runner is the encoder's own and also its process group and session,
    and the parent-death signal (SIGKILL) survived both execs.
    """
    log = (tmp_path / "encoder.log").open("wb")
    proto = EncoderProtocol(log, LOG_LIMIT, None, lambda value: None, reactor)
    argv = [sys.executable, "-c", SELF_REPORT]
    transport = spawn_encoder(reactor, proto, argv, tmp_path, tool_env(tmp_path))
    pid = transport.pid
    ended = await proto.ended
    assert exit_status(ended) == (0, None), proto.tail.text()
    reported = (tmp_path / "encoder.log").read_text().split()
    assert reported == [str(pid), str(pid), str(pid), str(int(signal.SIGKILL))]


def _stored_pid(data: Path, job_id: str) -> int | None:
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    pid: int | None = json.loads(row[0])["pid"] if row else None
    return pid


def _reaped_within(pid: int, limit: float) -> tuple[float, int] | None:
    """Seconds until C{pid}, a child of ours or an orphan we adopt, ended and was reaped, and its wait status; None if it still ran after C{limit}."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Not ours yet: its parent, killed, has not finished exiting,
            # and only then does the subreaper (this process) adopt it.
            done, status = 0, 0
        if done == pid:
            return time.monotonic() - start, status
        time.sleep(0.005)
    return None


def _kill_and_reap(pid: int) -> None:
    """Leave nothing behind after a failure: kill the orphan C{pid} (and its group, if it leads one) and reap it."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of group C{pgid} runs (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                return True
    return False


def test_kill_9_of_the_node_kills_its_encoder(
    tmp_path: Path, clips: Any, subreaper: None, record_property: Any
) -> None:
    """
    A C{transcoder serve} killed with SIGKILL while an encoder that ignores
    SIGTERM and never ends runs: the encoder (whose pid, as stored for the
    job, is its own and its group's) is ended by SIGKILL within 3 s and no
    process of its group is left.  Before issue 16 it ran on until the next
    start's recovery stopped it.
    """
    profiles = tmp_path / "hang.toml"
    profiles.write_text(PROFILES)
    data = tmp_path / "data"
    server = serve(data, tmp_path / "server.log", "--profiles", str(profiles), "--workers", "1")
    try:
        job = upload(server.url, clips.av, "hang-forever")
        assert wait_for(lambda: _stored_pid(data, job["id"]) is not None, timeout=30)
        pid = _stored_pid(data, job["id"])
        assert pid is not None
        # The stored pid comes at the spawn, before setpriv and setsid have run.
        assert wait_for(lambda: list(encoders(data)) == [pid], timeout=10), list(encoders(data))
        fields = proc_stat(pid)
        assert fields is not None and int(fields[2]) == int(fields[3]) == pid
        assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(sys.executable)
        server.proc.kill()
        reaped = _reaped_within(pid, GONE_WITHIN)
    finally:
        server.kill()
    if reaped is None:
        _kill_and_reap(pid)
    assert reaped is not None, f"the encoder {pid} outlived its node by {GONE_WITHIN} s"
    took, status = reaped
    record_property("encoder_gone_after_s", round(took, 3))
    print(f"encoder gone {took:.3f} s after the node's SIGKILL")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not _group_alive(pid)
    assert not alive(pid)
    assert "stopping leftover encoder" not in server.log_text()


def test_kill_9_of_the_node_kills_its_probe(tmp_path: Path, subreaper: None) -> None:
    """
    A node killed with SIGKILL while ffprobe reads an input (here a FIFO
    nobody writes to, where ffprobe waits forever): ffprobe is ended by
    SIGKILL with it, within 3 s.
    """
    fifo = tmp_path / "input.avi"
    os.mkfifo(fifo)
    node = subprocess.Popen(
        [sys.executable, "-c", PROBING_NODE, str(fifo)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        found: list[int] = []

        def probe_started() -> bool:
            found[:] = [
                int(e.name)
                for e in Path("/proc").iterdir()
                if e.name.isdigit() and _names(int(e.name), str(fifo))
            ]
            return bool(found)

        assert wait_for(probe_started, timeout=30)
        [pid] = found
        fields = proc_stat(pid)
        assert fields is not None and int(fields[1]) == node.pid
        node.kill()
        node.wait()
        reaped = _reaped_within(pid, GONE_WITHIN)
    finally:
        node.kill()
        node.wait()
    if reaped is None:
        _kill_and_reap(pid)
    assert reaped is not None, f"ffprobe {pid} outlived its node by {GONE_WITHIN} s"
    _took, status = reaped
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _names(pid: int, text: str) -> bool:
    """Whether the live process C{pid} is ffprobe with C{text} in its argv."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe) == "ffprobe" and any(text.encode() in a for a in argv)

"""
Restart recovery with a real server process: kill -9 it while an encoder
runs, or while an upload streams in, and start it again on the same data dir.

The encoder here is ffmpeg reading its input at native speed (C{-re}), so a
job takes as long as its clip whatever else loads the machine: the test knows
the encoder is still running when the server comes back, and stays short.
Since issue 16 an encoder dies with its server (test_deathsig); the servers
here run without setpriv (L{without_setpriv}), as older nodes did, so that
their encoders outlive them as recovery must expect.

This module also holds the helpers that C{test_engine_limits} shares: the
paced profile, encoders found through /proc, and small HTTP calls.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess, processes_mentioning, serve

from transcoder.core.jobs import new_job_id

PACED_PROFILE = "paced-h264"
_PROFILES_TOML = f"""
[{PACED_PROFILE}]
description = "H.264/AAC in MP4, reading the input at its native rate: a job lasts as long as its clip."
executable = "ffmpeg"
argv = [
    "-nostdin", "-y", "-nostats", "-progress", "pipe:1", "-re", "-i", "{{file}}",
    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
    "-c:a", "aac", "-b:a", "64k", "-f", "mp4", "{{output}}",
]
output_extension = "mp4"
media_type = "video/mp4"
progress = "ffmpeg"
"""
_PR_SET_CHILD_SUBREAPER = 36


# -- helpers shared with test_engine_limits ------------------------------------


def make_clip(path: Path, seconds: float) -> Path:
    """C{seconds} of 320x240 H.264 video and AAC audio in MP4."""
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-v", "error", "-y"),
            *("-f", "lavfi", "-i", f"testsrc=size=320x240:rate=25:duration={seconds}"),
            *("-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"),
            *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"),
            *("-c:a", "aac", "-b:a", "64k", "-shortest", str(path)),
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="module")
def paced_profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --profiles file adding the paced profile to the built-ins."""
    path = tmp_path_factory.mktemp("profiles") / "paced.toml"
    path.write_text(_PROFILES_TOML)
    return path


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether C{pid} runs: a zombie has ended, it only waits to be reaped."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def encoders(data_dir: Path) -> dict[int, Path]:
    """
    Live encoders of the server on C{data_dir}: processes that lead a session
    of their own (the runner starts each through setsid) and work in a job
    directory.  ffprobe runs in the server's session and cwd, so it is not counted.
    """
    jobs = os.path.realpath(data_dir / "jobs") + "/"
    found: dict[int, Path] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X") or int(fields[3]) != pid:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(jobs):
            found[pid] = Path(cwd)
    return found


def upload(url: str, clip: Path, profile: str) -> dict[str, Any]:
    """PUT C{clip} as a new job; the created job's JSON."""
    request = urllib.request.Request(
        f"{url}/jobs?profile={profile}", data=clip.read_bytes(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 201
        job: dict[str, Any] = json.load(answer)
    return job


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=70) as answer:
        return json.load(answer)


def wait_job(
    url: str, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """Long-poll the job until C{until} holds for it."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = get_json(f"{url}/jobs/{job_id}")
    while not until(job):
        left = deadline - time.monotonic()
        assert left > 0, f"job {job_id} never got there: {job}"
        job = get_json(f"{url}/jobs/{job_id}?wait={min(5, max(1, int(left)))}")
    return job


def finished(job: dict[str, Any]) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def check_result(url: str, job: dict[str, Any], into: Path, seconds: float) -> None:
    """Download the job's result; ffprobe must read H.264 and AAC in MP4 lasting C{seconds}."""
    assert job["state"] == "succeeded", job
    path = into / f"{job['id']}.mp4"
    with urllib.request.urlopen(url + job["output"]["result_url"], timeout=30) as answer:
        path.write_bytes(answer.read())
    probe = subprocess.run(
        [
            *("ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json"),
            str(path),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    doc = json.loads(probe.stdout)
    assert "mp4" in doc["format"]["format_name"]
    assert sorted(s["codec_name"] for s in doc["streams"]) == ["aac", "h264"]
    assert abs(float(doc["format"]["duration"]) - seconds) <= 0.05 * seconds


@pytest.fixture
def subreaper(tmp_path: Path) -> Iterator[None]:
    """
    Make this test process the reaper of orphans (PR_SET_CHILD_SUBREAPER), so
    an encoder whose server was killed becomes our child: the test can then
    reap it and see how it ended, instead of leaving a zombie to an init that
    does not reap.  Any encoder still running on C{tmp_path}/data (the tests'
    data dir) at the end is killed and reaped.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in encoders(tmp_path / "data"):
            try:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@pytest.fixture
def without_setpriv(tmp_path: Path) -> dict[str, str]:
    """
    The environment of a node whose encoders outlive it: a PATH holding the
    tools the server runs but not setpriv, so it spawns as before issue 16
    (setsid alone, no parent-death signal), as a node of an older release
    did.  Its encoders survive a kill -9, which recovery is there for.
    """
    bin_dir = tmp_path / "bin-without-setpriv"
    bin_dir.mkdir()
    for tool in ("ffmpeg", "ffprobe", "mencoder", "setsid"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    return {"PATH": str(bin_dir)}


# -- tests ---------------------------------------------------------------------

RECOVERY_CLIP_SECONDS = 5


@pytest.fixture(scope="module")
def recovery_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "five.mp4", RECOVERY_CLIP_SECONDS)


def test_kill_9_while_encoding_then_restart(
    tmp_path: Path,
    paced_profiles: Path,
    recovery_clip: Path,
    subreaper: None,
    without_setpriv: dict[str, str],
) -> None:
    """
    kill -9 of a server whose encoders do not die with it (no setpriv: it
    warned at start) leaves the encoder alive (it has a session of its own).
    The server started again on the same data dir stops that encoder before
    listening, runs the job again from its stored input to success with a
    valid result, and no encoder of the first run is left, not even as a
    zombie.  (With setpriv the encoder dies with its server: test_deathsig.)
    """
    data = tmp_path / "data"
    extra = ("--profiles", str(paced_profiles), "--workers", "1")
    server = serve(data, tmp_path / "first.log", *extra, env=without_setpriv)
    assert "setpriv (util-linux) is not on PATH" in server.log_text()
    try:
        job = upload(server.url, recovery_clip, PACED_PROFILE)
        running = wait_job(server.url, job["id"], lambda j: j["progress"] > 0)
        assert running["state"] == "running"
        found = encoders(data)
        assert list(found.values()) == [data.resolve() / "jobs" / job["id"]], found
        (old,) = found
        server.kill()
        assert alive(old), "the encoder died with its server: nothing to recover from"
        assert encoders(data) == found
    finally:
        server.kill()

    second = serve(data, tmp_path / "second.log", *extra)
    try:
        # Recovery runs before the listener starts, so once the server answers
        # the old encoder has been stopped: it is our zombie, ended by a signal
        # it was sent (ffmpeg exits 255 on SIGTERM), not by finishing.
        assert not alive(old)
        assert f"stopping leftover encoder {old}" in second.log_text()
        reaped, status = os.waitpid(old, 0)
        assert reaped == old
        assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), status
        assert not Path(f"/proc/{old}").exists()

        done = wait_job(second.url, job["id"], finished)
        check_result(second.url, done, tmp_path, RECOVERY_CLIP_SECONDS)
        assert done["started_at"] > running["started_at"]
        # The same inputs; only what the probe learnt of them is added.
        assert [{**i, "media": None} for i in done["inputs"]] == job["inputs"]
        assert done["inputs"][0]["media"]["duration"] is not None
        assert encoders(data) == {}
        assert not list((data / "jobs" / job["id"]).glob("result.partial.*"))
        assert "Traceback" not in second.log_text()
    finally:
        second.stop()
    assert processes_mentioning(str(data)) == []


def _start_upload(server: ServerProcess, size: int, sent: bytes) -> socket.socket:
    """A raw upload that announces C{size} bytes and sends only C{sent}."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        f"PUT /jobs?profile={PACED_PROFILE} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
        + sent
    )
    return sock


def _staged_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "uploads").rglob("*") if p.is_file())


def test_kill_9_during_upload_leaves_nothing_after_restart(
    tmp_path: Path, paced_profiles: Path
) -> None:
    """
    kill -9 while a body streams in: after a restart on the same data dir no
    partial upload is left on disk and no job is visible, and neither is a
    job directory that the crash caught before its job was stored.
    """
    data = tmp_path / "data"
    server = serve(data, tmp_path / "first.log", "--profiles", str(paced_profiles))
    sock = _start_upload(server, 64 << 20, os.urandom(2 << 20))
    try:
        deadline = time.monotonic() + 10
        while _staged_bytes(data) < 1 << 20:
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.02)
        server.kill()
    finally:
        sock.close()
        server.kill()
    assert _staged_bytes(data) > 0
    # Where a crash between moving an upload into place and storing its job
    # leaves it: a job directory with an input that no stored job owns.
    unowned = data / "jobs" / new_job_id()
    unowned.mkdir(parents=True)
    (unowned / "input-file").write_bytes(b"\0" * 1024)

    second = serve(data, tmp_path / "second.log", "--profiles", str(paced_profiles))
    try:
        assert get_json(second.url + "/jobs")["jobs"] == []
        assert list((data / "uploads").iterdir()) == []
        assert list((data / "jobs").iterdir()) == []
        # The server still takes uploads after cleaning up.
        sock = _start_upload(second, 1024, os.urandom(1024))
        with sock:
            assert sock.recv(64).startswith(b"HTTP/1.1 201")
        (job,) = get_json(second.url + "/jobs")["jobs"]
        assert job["inputs"][0]["size"] == 1024
    finally:
        second.stop()


def test_leftover_encoder_found_without_its_stored_pid(
    tmp_path: Path,
    paced_profiles: Path,
    recovery_clip: Path,
    subreaper: None,
    without_setpriv: dict[str, str],
) -> None:
    """
    The pid of a new encoder reaches the database a little after the encoder
    started (on_spawn -> an asynchronous store write); a server whose
    encoders do not die with it (no setpriv), killed in between, leaves a
    running encoder whose job is stored without its pid.
    The restarted server must still find that encoder (it works in the job's
    directory, in a session of its own) and stop it before running the job
    again, or two encoders run the same job at once.  The lost write is made
    here by clearing the stored pid while the server is down.
    """
    data = tmp_path / "data"
    extra = ("--profiles", str(paced_profiles), "--workers", "1")
    server = serve(data, tmp_path / "first.log", *extra, env=without_setpriv)
    try:
        job = upload(server.url, recovery_clip, PACED_PROFILE)
        wait_job(server.url, job["id"], lambda j: j["progress"] > 0)
        (old,) = encoders(data)
        server.kill()
    finally:
        server.kill()
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        (record,) = db.execute("SELECT record FROM jobs WHERE id = ?", (job["id"],)).fetchone()
        stored = json.loads(record)
        assert stored["state"] == "running" and stored["pid"] == old
        stored["pid"] = None
        db.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(stored), job["id"]))
    assert alive(old)

    second = serve(data, tmp_path / "second.log", *extra)
    try:
        assert not alive(old), "the first run's encoder still runs beside the new one"
        done = wait_job(second.url, job["id"], finished)
        check_result(second.url, done, tmp_path, RECOVERY_CLIP_SECONDS)
    finally:
        second.stop()

"""
Faults, for real: the server killed with SIGKILL while uploads of every kind
stream in; a data dir on a 64 MiB tmpfs filled by an upload and by an
encoder's output; an encoder that hangs (ignoring SIGTERM) and one that floods
its output.  Nothing half-made survives, the server keeps answering, and its
memory stays flat.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import run_ffmpeg, tmpfs
from serverproc import ServerProcess, reset_peak_rss, wait_for

MiB = 1 << 20
PY = json.dumps(sys.executable)

HANG = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(1e9)
"""
# 192 MiB of short lines on stdout and 96 MiB of one endless line on stderr.
FLOOD = """
import os
line = (b"x" * 1023 + b"\\n") * 64
for _ in range(3072):
    os.write(1, line)
blob = b"y" * (1 << 20)
for _ in range(96):
    os.write(2, blob)
"""

PROFILES = f"""
[hang]
executable = {PY}
argv = ["-c", {json.dumps(HANG)}, "{{file}}", "{{output}}"]
timeout = 2

[flood]
executable = {PY}
argv = ["-c", {json.dumps(FLOOD)}, "{{file}}", "{{output}}"]
timeout = 120

[bloat]
description = "Raw 1080p video: 3 s of it is about 450 MB, more than the tmpfs holds."
executable = "ffmpeg"
argv = ["-nostdin", "-y", "-v", "error", "-i", "{{file}}", "-vf", "scale=1920:1080",
        "-c:v", "rawvideo", "-an", "-f", "avi", "{{output}}"]
output_extension = "avi"
"""


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30) as r:
        doc = json.loads(r.read())
    assert isinstance(doc, dict)
    return doc


def put(url: str, data: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=data, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_job(server: ServerProcess, job_id: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get(f"{server.url}/jobs/{job_id}?wait=5")
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def processes_in(directory: Path) -> list[str]:
    """Live processes that name C{directory} in their argv or work in it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(") ", 1)[1][:1]
        except OSError:
            continue
        if state != "Z" and (str(directory) in cmdline or cwd.startswith(str(directory))):
            found.append(f"{entry.name}: {cmdline!r}")
    return found


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "faults.toml"
    path.write_text(PROFILES)
    return path


# kill -9 with uploads in flight


def _start(server: ServerProcess, head: str, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    return s


def test_kill_9_with_uploads_of_every_kind_in_flight(tmp_path: Path) -> None:
    """SIGKILL while a raw, a chunked and a multipart upload stream in: after a restart the job finished before is intact, and nothing of the three remains, neither a file nor a job."""
    data = tmp_path / "data"
    server = ServerProcess(data, "--workers", "1", "--min-free-disk", "0")
    sockets: list[socket.socket] = []
    try:
        done_bytes = os.urandom(3 * MiB)
        status, done = put(f"{server.url}/jobs?profile=avi-mpeg4&filename=kept.flv", done_bytes)
        assert status == 201
        # Random bytes fail their probe: the job is finished before the crash.
        done = wait_job(server, str(done["id"]))
        part = os.urandom(2 * MiB)
        sockets += [
            _start(
                server,
                "PUT /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\nContent-Length: 50000000",
                part,
            ),
            _start(
                server,
                "PUT /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\nTransfer-Encoding: chunked",
                b"%x\r\n" % len(part) + part + b"\r\n",
            ),
            _start(
                server,
                "POST /jobs HTTP/1.1\nHost: x\nContent-Length: 50000000\n"
                "Content-Type: multipart/form-data; boundary=XyZ",
                b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
                b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.flv"'
                b"\r\n\r\n" + part,
            ),
        ]
        uploads = data / "uploads"

        def staged() -> list[int]:
            return [p.stat().st_size for p in uploads.rglob("*") if p.is_file()]

        assert wait_for(lambda: len(staged()) == 3 and min(staged()) >= MiB), staged()
        server.kill()
    finally:
        for s in sockets:
            s.close()
        server.stop()

    again = ServerProcess(data, "--workers", "1", "--min-free-disk", "0")
    try:
        jobs = get(f"{again.url}/jobs")["jobs"]
        assert isinstance(jobs, list)
        assert [j["id"] for j in jobs] == [done["id"]]
        assert jobs[0]["state"] == done["state"]
        assert jobs[0]["inputs"] == done["inputs"]
        assert list((data / "uploads").iterdir()) == []
        assert [p.name for p in (data / "jobs").iterdir()] == [done["id"]]
        (kept,) = (data / "jobs" / str(done["id"])).glob("input-file*")
        assert sha256(kept) == hashlib.sha256(done_bytes).hexdigest()
        status, _ = put(f"{again.url}/jobs?profile=avi-mpeg4", os.urandom(1000))
        assert status == 201
    finally:
        again.stop()
    assert "Traceback" not in again.output, again.output


# A data dir on a small tmpfs


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with tmpfs(tmp_path_factory.mktemp("tmpfs"), "64m") as mountpoint:
        yield mountpoint


@pytest.fixture(scope="module")
def full_server(small_disk: Path, profiles: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        small_disk / "data",
        *("--min-free-disk", "0", "--workers", "1", "--profiles", str(profiles)),
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output, srv.output


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_upload_larger_than_the_disk_gets_507_and_leaves_nothing(
    full_server: ServerProcess, small_disk: Path, tmp_path: Path, form: str, clips
) -> None:  # type: ignore[no-untyped-def]
    """A 100 MiB upload into a 64 MiB tmpfs: 507 insufficient_storage, the partial file gone and the space back, the server still answering and taking the next upload."""
    free_before = _free(small_disk)
    big = tmp_path / "big.flv"
    with big.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(MiB))
    url = f"{full_server.url}/jobs"
    if form == "raw":
        args = ["-T", str(big), url + "?profile=avi-mpeg4"]
    else:
        args = ["-F", "profile=avi-mpeg4", "-F", f"file=@{big}", url]
    r = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body, _, code = r.stdout.rpartition("\n")
    assert code == "507", r
    assert json.loads(body)["error"]["code"] == "insufficient_storage"
    uploads = small_disk / "data" / "uploads"
    assert wait_for(lambda: not any(uploads.iterdir()))
    assert wait_for(lambda: _free(small_disk) >= free_before - MiB)
    assert get(f"{full_server.url}/health")["status"] == "ok"
    status, job = put(f"{url}?profile=avi-mpeg4", clips.av.read_bytes())
    assert status == 201, job
    wait_job(full_server, str(job["id"]))


def test_encode_that_runs_out_of_space_fails_with_the_reason(
    full_server: ServerProcess, small_disk: Path, clips
) -> None:  # type: ignore[no-untyped-def]
    """An input that fits but an output that does not: the job fails saying the device is full, its partial output is removed, and the space comes back."""
    free_before = _free(small_disk)
    status, job = put(f"{full_server.url}/jobs?profile=bloat", clips.av.read_bytes())
    assert status == 201, job
    done = wait_job(full_server, str(job["id"]))
    assert done["state"] == "failed"
    error = done["error"]
    assert isinstance(error, dict)
    assert "No space left on device" in error["message"], error
    job_dir = small_disk / "data" / "jobs" / str(job["id"])
    assert not list(job_dir.glob("result*"))
    assert _free(small_disk) >= free_before - clips.av.stat().st_size - MiB
    assert get(f"{full_server.url}/health")["status"] == "ok"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs of the test's own, as in issue 14."""
    with tmpfs(tmp_path / "tmpfs", "12m") as mountpoint:
        yield mountpoint


def test_mencoder_filling_the_disk_fails_the_job(tiny_disk: Path, tmp_path: Path) -> None:
    """
    Issue 14's reproduction: a 30 s noisy clip sent to avi-mpeg4 at 20 Mbit/s
    on a 12 MiB tmpfs with --min-free-disk 1, filled once the upload is in to
    leave about 128 KiB.  mencoder hits ENOSPC, exits 0 and writes a
    header claiming all 750 frames over a file that holds a third of them:
    the job fails naming the full disk (never succeeded), its partial output
    is gone and the space is back.
    """
    clip = tmp_path / "noise.mov"
    run_ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=duration=30:size=320x240:rate=25,noise=alls=20:allf=t"),
        *("-c:v", "mpeg4", "-b:v", "100k", str(clip)),
    )
    data = tiny_disk / "data"
    server = ServerProcess(data, "--min-free-disk", "1", "--workers", "1")
    try:
        # Whatever this machine's encoder makes of the clip (257 KB here),
        # the disk cannot hold it: the disk fills during the encode.
        # The upload needs its size plus the 1 MiB kept for the job database
        # free; once it is in, the filler takes all but 128 KiB.
        filler = tiny_disk / "filler"
        with filler.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, _free(tiny_disk) - clip.stat().st_size - 2 * MiB)
            status, job = put(
                f"{server.url}/jobs?profile=avi-mpeg4&vbitrate=20000", clip.read_bytes()
            )
            assert status == 201, job
            os.posix_fallocate(
                f.fileno(), 0, f.seek(0, os.SEEK_END) + _free(tiny_disk) - 128 * 1024
            )
        done = wait_job(server, str(job["id"]))
        print(f"job: {done['state']}, {done['error']}")
        assert done["state"] == "failed", done
        error = done["error"]
        assert isinstance(error, dict)
        assert "the data disk is full" in error["message"], error
        assert "output discarded" in error["message"]
        job_dir = data / "jobs" / str(job["id"])
        assert not list(job_dir.glob("result*"))
        # What the partial output took is back (the encoder's log stays).
        assert _free(tiny_disk) > 64 * 1024
        assert get(f"{server.url}/jobs/{job['id']}")["state"] == "failed"
    finally:
        server.stop()


# Encoders that misbehave


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, profiles: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("encoders") / "data",
        *("--min-free-disk", "0", "--workers", "2", "--kill-grace", "1s"),
        *("--profiles", str(profiles)),
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output, srv.output


def _seconds(job: dict[str, object], key: str) -> float:
    return datetime.fromisoformat(str(job[key]).replace("Z", "+00:00")).timestamp()


def test_encoder_that_hangs_is_killed_by_its_time_limit(server: ServerProcess, clips) -> None:  # type: ignore[no-untyped-def]
    """An encoder that ignores SIGTERM and sleeps forever is stopped at the profile's 2 s limit (KILL after the 1 s grace): the job fails saying so, and no process of it is left."""
    status, job = put(f"{server.url}/jobs?profile=hang", clips.av.read_bytes())
    assert status == 201
    job_dir = server.data_dir / "jobs" / str(job["id"])
    assert wait_for(lambda: processes_in(job_dir) != [], timeout=10)
    done = wait_job(server, str(job["id"]), timeout=30)
    assert done["state"] == "failed"
    error = done["error"]
    assert isinstance(error, dict)
    assert "timed out after 2 s" in error["message"]
    took = _seconds(done, "finished_at") - _seconds(done, "started_at")
    assert 2 <= took < 8, took
    assert wait_for(lambda: processes_in(job_dir) == [], timeout=5), processes_in(job_dir)


def test_encoder_that_floods_its_output_does_not_grow_the_server(
    server: ServerProcess, clips
) -> None:  # type: ignore[no-untyped-def]
    """288 MiB of output (short lines on stdout, one endless line on stderr): the server's peak RSS grows by less than 20 MiB, the log on disk stops at its 16 MiB cap and says so, and the job's error stays short."""
    from transcoder.engine.process import LOG_LIMIT

    before = server.rss()
    if not reset_peak_rss(server.pid):
        before = max(before, server.peak_rss())
    status, job = put(f"{server.url}/jobs?profile=flood", clips.av.read_bytes())
    assert status == 201
    done = wait_job(server, str(job["id"]), timeout=120)
    growth = server.peak_rss() - before
    print(f"server peak RSS growth during a 288 MiB flood: {growth / MiB:.1f} MiB")
    assert growth < 20 * MiB, growth
    log = server.data_dir / "jobs" / str(job["id"]) / "encoder.log"
    size = log.stat().st_size
    assert LOG_LIMIT <= size <= LOG_LIMIT + 200
    with log.open("rb") as f:
        f.seek(-200, os.SEEK_END)
        assert b"log truncated" in f.read()
    assert done["state"] == "failed"
    assert len(json.dumps(done)) < 16_000
    with urllib.request.urlopen(f"{server.url}/jobs/{job['id']}/log?tail=5", timeout=30) as r:
        lines = r.read().splitlines()
    assert 0 < len(lines) <= 5

"""
The memory a tus upload costs the server, against a real server and beside a
plain upload of the same file: PATCH bodies go through the same pump and
spool as a plain body, so sending 1 GiB in 64 MiB PATCHes must not cost more
than sending it in one request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

from serverproc import ServerProcess, reset_peak_rss, wait_for
from tus_sendfile import upload_file

from transcoder.http.bodies import spool_limits
from transcoder.http.pump import BUFFER_SIZE, BUFFERS
from transcoder.http.writer import STAGING_BUFFERS, STAGING_SIZE

MiB = 1 << 20
SIZE = 1024 * MiB
CHUNK = 64 * MiB
# One upload's worth of the server's own buffers, all sizes fixed in the code:
# the pump's (3 x 2 MiB), the spool's backlog (4 MiB) and its staging buffers
# (4 x 1 MiB).  See test_tus_patches_grow_the_server_no_more_than_a_plain_upload.
ONE_UPLOADS_BUFFERS = BUFFERS * BUFFER_SIZE + spool_limits(1)[0] + STAGING_BUFFERS * STAGING_SIZE


def make_file(path: Path, size: int) -> Path:
    """Bytes that neither repeat nor compress, written 1 MiB at a time (one os.urandom block
    with a counter in front: about a second a GiB rather than os.urandom's several)."""
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
    return path


def peak_growth(server: ServerProcess, run: Callable[[], str]) -> int:
    """How far the server's peak RSS rose above its RSS while C{run} uploaded; waits,
    outside the measurement, for the job the upload made to end."""
    before = server.rss()
    assert reset_peak_rss(server.pid), "this kernel does not let /proc/PID/clear_refs reset VmHWM"
    job = run()
    growth = server.peak_rss() - before

    def ended() -> bool:
        with urllib.request.urlopen(f"{server.url}{job}", timeout=10) as r:
            return json.load(r)["state"] not in ("queued", "running")

    # Random bytes fail their probe at once; the next upload should not share the
    # server with that job's end.
    assert wait_for(ended, timeout=60)
    return growth


def plain(server: ServerProcess, path: Path) -> str:
    r = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-T", str(path),
         f"{server.url}/jobs?profile=avi-mpeg4&filename=big.flv"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    body, _, code = r.stdout.rpartition("\n")
    assert code == "201", (code, body, r.stderr)
    return f"/jobs/{json.loads(body)['id']}"


def tus(server: ServerProcess, path: Path, chunk: int) -> str:
    answer = upload_file(server.port, str(path), chunk, profile="avi-mpeg4", filename="big.flv")
    job = answer.get("Job-Location")
    assert job is not None, answer
    return job


def test_tus_patches_grow_the_server_no_more_than_a_plain_upload(tmp_path: Path) -> None:
    """
    1 GiB sent as sixteen 64 MiB tus PATCHes (sendfile from disk) grows the
    server's peak RSS by no more than the same file sent with C{curl -T} does,
    plus one upload's worth of the server's buffers (14 MiB).

    Both paths are warmed up first with 16 MiB each (tus in two PATCHes, each
    big enough for the pump),
    so neither pays for what the server sets up once.  The margin: what both
    grow by is the server's own buffers, whose sizes are fixed in the code,
    not the body (16 MiB and 1 GiB grow alike); what varies between machines
    and runs is how many of them are resident at the peak: how full the spool's
    backlog gets (the disk against the socket), and which freed buffers the
    allocator keeps rather than gives back (glibc raises its mmap threshold
    after a big free), and the tus upload has sixteen PATCHes to reach its
    peak where the plain one has one.  At most one more set of those buffers
    can differ; a PATCH that held its chunk in memory (64 MiB), or a quarter
    of it, would not fit.  Measured here: plain +6 MiB, tus +8 MiB.
    """
    src = make_file(tmp_path / "big.flv", SIZE)
    warm = make_file(tmp_path / "warm.flv", 16 * MiB)
    data = tmp_path / "data"
    server = ServerProcess(data, "--max-upload-size", "2G", "--workers", "1")
    try:
        server.wait_healthy()
        peak_growth(server, lambda: plain(server, warm))
        peak_growth(server, lambda: tus(server, warm, 8 * MiB))
        plain_growth = peak_growth(server, lambda: plain(server, src))
        tus_growth = peak_growth(server, lambda: tus(server, src, CHUNK))
    finally:
        server.stop()
        # 3 GiB by now: pytest keeps the last runs' temporary directories.
        shutil.rmtree(data, ignore_errors=True)
        src.unlink()
    print(
        f"server peak RSS growth: plain {plain_growth / MiB:.1f} MiB, tus {tus_growth / MiB:.1f} MiB"
    )
    assert tus_growth <= plain_growth + ONE_UPLOADS_BUFFERS, (
        f"tus grew the server by {tus_growth / MiB:.1f} MiB, a plain upload by "
        f"{plain_growth / MiB:.1f} MiB (+{ONE_UPLOADS_BUFFERS / MiB:.0f} allowed)"
    )

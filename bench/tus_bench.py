#!/usr/bin/env python3
"""tus PATCHes against a plain curl -T of the same file, to the same server, in the same run.

usage: tus_bench.py SIZE_MIB ROUNDS [CHUNK_MIB]   (CHUNK_MIB default 64)

The project is started once (PROJECT_CMD on 127.0.0.1:18090, as upload_bench.py starts it).
Every round sends the file twice, in turns whose order swaps each round:
  curl -T   curl -T FILE to PROJECT_URL (default .../jobs?profile=avi-mpeg4)
  tus       bench/tus_client.py: POST /uploads, then PATCHes of CHUNK_MIB, one connection
            each, each body read and written 1 MiB at a time as curl -T sends a file
Round 0 is a warm-up.  Per row:
  MB/s        size / the client's whole run (process start to its last answer), median
              (min-max), and the ratio to curl -T's
  cpu s/GiB   the server's user+sys CPU during the upload (/proc/PID/stat), median, and
              the ratio to curl -T's
  client      the client process's own user+sys CPU (wait4), median: apart from the
              server's, since both share the machine's cores
  rss         the largest growth of the server's peak RSS (VmHWM, reset before each upload
              through /proc/PID/clear_refs) over its RSS before the upload, MiB
The job each upload makes (random bytes: it fails at once) is waited for outside the timed
window.  Environment: PROJECT_CMD, PROJECT_URL as for upload_bench.py; CLIENT_PY (default:
this python) runs tus_client.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import upload_bench as ub

HERE = Path(__file__).resolve().parent
DEFAULT_PROJECT_URL = "http://127.0.0.1:18090/jobs?profile=avi-mpeg4"


def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """Run C{argv}; its wall time, its own CPU seconds (user + sys, from wait4: what it
    adds to this process's RUSAGE_CHILDREN) and its output."""
    before = os.times()
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True)
    dt = time.perf_counter() - t
    after = os.times()
    if proc.returncode:
        raise SystemExit(
            f"{argv[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    used = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return dt, used, proc.stdout.decode()


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.speed: list[float] = []
        self.server: list[float] = []
        self.client: list[float] = []
        self.rss = 0.0


def settle(base: str, job: str) -> None:
    """Wait until the upload's job has ended, so its encoder is not in the next upload's way."""
    end = time.time() + 120
    while job and time.time() < end:
        try:
            with urllib.request.urlopen(f"{base}{job}", timeout=5) as r:
                if json.load(r).get("state") not in ("queued", "running"):
                    return
        except (OSError, ValueError):
            return
        time.sleep(0.2)


def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    size_mib, rounds = int(sys.argv[1]), int(sys.argv[2])
    chunk_mib = int(sys.argv[3]) if len(sys.argv) == 4 else 64
    client_py = os.environ.get("CLIENT_PY", sys.executable)
    url = os.environ.get("PROJECT_URL", DEFAULT_PROJECT_URL)
    base = url.split("/jobs")[0]
    # A SIGTERM (make interrupted) must still stop the server through the finally block.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="tusbench-")
    server = ub.Target("project", work)
    try:
        src = os.path.join(work, "src.bin")
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size_mib):
                f.write(block)
        server.start()
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise SystemExit(f"the project exited at start (port {server.port} taken?)")
        pid = server.proc.pid
        answer = os.path.join(work, "answer.json")
        plain = Row("curl -T")
        tus = Row(f"tus {chunk_mib} MiB")
        commands = {
            plain.name: ["curl", "-sS", "-f", "-o", answer, "-T", src, url],
            tus.name: [
                client_py, str(HERE / "tus_client.py"), base, src, str(chunk_mib << 20),
                "profile=avi-mpeg4", "filename=src.bin",
            ],
        }  # fmt: skip
        for r in range(rounds + 1):  # round 0 is a warm-up
            for row in (plain, tus) if r % 2 else (tus, plain):
                before = ub.status(pid, "VmRSS")
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                c0 = ub.cpu(pid)
                dt, client, out = run_measured(commands[row.name])
                used = ub.cpu(pid) - c0
                growth = ub.status(pid, "VmHWM") - before
                if row is plain:
                    job = "/jobs/" + json.load(open(answer))["id"]
                else:
                    job = out.strip()
                if not job.startswith("/jobs/"):
                    raise SystemExit(f"{row.name}: no job ({out!r})")
                settle(base, job)
                if r:
                    gib = size_mib / 1024
                    row.speed.append(size_mib * 1048576 / dt / 1e6)
                    row.server.append(used / gib)
                    row.client.append(client / gib)
                    row.rss = max(row.rss, growth)
        speed0 = statistics.median(plain.speed)
        cpu0 = statistics.median(plain.server)
        print(
            f"upload {size_mib} MiB x{rounds} to the project, curl -T and tus PATCHes of "
            f"{chunk_mib} MiB; MB/s median (min-max); ratio to curl -T; server cpu s/GiB "
            f"(ratio); client cpu s/GiB; server peak RSS growth MiB (largest of the rounds)"
        )
        for row in (plain, tus):
            v = row.speed
            print(
                f"{row.name:12s} {statistics.median(v):6.0f} ({min(v):.0f}-{max(v):.0f})"
                f"  x{statistics.median(v) / speed0:5.2f}"
                f"  cpu {statistics.median(row.server):5.2f}"
                f" (x{statistics.median(row.server) / cpu0:4.2f})"
                f"  client {statistics.median(row.client):5.2f}"
                f"  rss +{row.rss:.0f}"
            )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

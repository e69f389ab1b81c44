#!/usr/bin/env python3
"""
Result download speed and memory (issue 5): a big job result fetched with curl
from `transcoder serve` (GET /jobs/<id>/result) beside nginx serving the same
file from the same place.

The result is made through the real API: a raw-video NUT file of SIZE_MIB is
uploaded with `curl -T` to a profile, added with --profiles, that copies its
streams into a new NUT file (`ffmpeg -i IN -map 0 -c copy -f nut OUT`), so the
result is as big as the input and a valid media file.

Targets, in turns within every round (round 0 is a warm-up, not counted; the
file is in the page cache for all of them):
  project        transcoder serve
  nginx          nginx 1.22, one worker, `sendfile off` (nginx's own default)
  nginx-sendfile the same with `sendfile on; tcp_nopush on;` (Debian's packaged
                 nginx.conf turns sendfile on)

Per target: MB/s (10^6 bytes/s, size over curl's time_total) median (min-max),
the ratio to each nginx (target: project >= 0.8x nginx), the server's user+sys
CPU seconds per GiB sent, and its peak RSS (VmHWM, MiB; target for the project:
<= 60).  For the project the peak is over the downloads only (VmHWM reset
once the job had ended, so the upload's own peak is not counted, but what
the upload left behind is: the same process serves both); beside it are its
RSS just before the first download (what the downloads' peak grew from),
just after start-up, and its peak over the whole run, the upload and the job
included.

usage: download_bench.py [--size-mib 1024] [--rounds 5]
needs: ffmpeg, curl, nginx on PATH; run with the project's virtualenv python,
whose `transcoder` it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _project_server import TICK, ProjectServer

_FRAME = (1280, 720)
_PROFILE = "copy-nut"
_PROFILES_TOML = f"""
[{_PROFILE}]
description = "Copy the input's streams into NUT (download bench)."
executable = "ffmpeg"
argv = ["-nostdin", "-y", "-nostats", "-progress", "pipe:1", "-i", "{{file}}",
        "-map", "0", "-c", "copy", "-f", "nut", "{{output}}"]
output_extension = "nut"
media_type = "video/x-nut"
progress = "ffmpeg"
"""
_NGINX_CONF = """
worker_processes 1;
user root;
daemon off;
pid nginx.pid;
error_log logs/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{plain};
        root {root};
        sendfile off;
    }}
    server {{
        listen 127.0.0.1:{sendfile};
        root {root};
        sendfile on;
        tcp_nopush on;
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def pids_of(pid: int) -> list[int]:
    """A server and its children, encoders left out (none run while downloading)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, kids)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in pids_of(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            pass
    return total


def peak_rss_mib(pid: int) -> float:
    best = 0.0
    for p in pids_of(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def make_input(path: Path, size_mib: int) -> None:
    """About SIZE_MIB of raw 720p video in NUT: fast to make, and copied as it is."""
    w, h = _FRAME
    frames = -(-size_mib * (1 << 20) // (w * h * 3 // 2))
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=size={w}x{h}:rate=25",
            "-frames:v",
            str(frames),
            "-c:v",
            "rawvideo",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "nut",
            str(path),
        ],
        check=True,
    )


class Project(ProjectServer):
    def __init__(self, work: Path) -> None:
        profiles = work / "profiles.toml"
        profiles.write_text(_PROFILES_TOML)
        super().__init__(work, "--profiles", str(profiles), "--max-upload-size", "16G")

    def make_result(self, source: Path) -> tuple[str, Path]:
        """Upload C{source} to the copy profile; the result's URL and file once it succeeded."""
        answer = subprocess.run(
            ["curl", "-sS", "-T", str(source), f"{self.url}/jobs?profile={_PROFILE}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        job = json.loads(answer)
        if "id" not in job:
            raise SystemExit(f"upload refused: {answer}")
        while job["state"] in ("queued", "running"):
            with urllib.request.urlopen(f"{self.url}/jobs/{job['id']}?wait=60", timeout=90) as r:
                job = json.load(r)
        if job["state"] != "succeeded":
            raise SystemExit(f"the job {job['state']}: {job.get('error')}")
        (result,) = (self.data_dir / "jobs" / job["id"]).glob("result.*")
        return self.url + job["output"]["result_url"], result


class Nginx:
    def __init__(self, work: Path, root: Path) -> None:
        prefix = work / "nginx"
        (prefix / "logs").mkdir(parents=True)
        self.plain, self.sendfile = free_port(), free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(plain=self.plain, sendfile=self.sendfile, root=root))
        self.argv = ["nginx", "-p", str(prefix), "-c", str(conf)]
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_listening(self.plain)
        wait_listening(self.sendfile)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def download(url: str, size: int) -> float:
    """Seconds curl takes to fetch C{url} into /dev/null."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if out[0] != "200" or int(out[1]) != size:
        raise SystemExit(f"{url}: HTTP {out[0]}, {out[1]} of {size} bytes")
    return float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="download-bench-"))
    project = nginx = None
    try:
        source = work / "input.nut"
        make_input(source, args.size_mib)
        project = Project(work)
        start_rss = rss_mib(project.proc.pid)
        url, result = project.make_result(source)
        source.unlink()
        size = result.stat().st_size
        run_peak = peak_rss_mib(project.proc.pid)
        # From here on the peak is what downloads cost, on top of what is resident now.
        Path(f"/proc/{project.proc.pid}/clear_refs").write_text("5")
        before_rss = rss_mib(project.proc.pid)
        nginx = Nginx(work, result.parent)
        targets = {
            "project": (url, project.proc.pid),
            "nginx": (f"http://127.0.0.1:{nginx.plain}/{result.name}", nginx.proc.pid),
            "nginx-sendfile": (f"http://127.0.0.1:{nginx.sendfile}/{result.name}", nginx.proc.pid),
        }
        speed: dict[str, list[float]] = {t: [] for t in targets}
        cpu: dict[str, list[float]] = {t: [] for t in targets}
        for rnd in range(args.rounds + 1):
            for name, (target_url, pid) in targets.items():
                c = cpu_seconds(pid)
                took = download(target_url, size)
                used = cpu_seconds(pid) - c
                if rnd:
                    speed[name].append(size / took / 1e6)
                    cpu[name].append(used / (size / (1 << 30)))
                print(
                    f"round {rnd}{' (warm-up)' if not rnd else ''} {name}: "
                    f"{size / took / 1e6:.0f} MB/s",
                    file=sys.stderr,
                )

        med = {t: statistics.median(v) for t, v in speed.items()}
        print(
            f"\ndownload of a {size / (1 << 20):.0f} MiB result with curl, {args.rounds} rounds "
            "(+1 warm-up)\n"
        )
        print(
            "| target | MB/s median (min-max) | ratio to nginx | ratio to nginx-sendfile "
            "| cpu s/GiB | peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|")
        for name in targets:
            v = speed[name]
            rss = peak_rss_mib(targets[name][1])
            if name == "project":
                # To a tenth: the target is 60 MiB and the margin is a few.
                rss_text = (
                    f"{rss:.1f} (before downloads {before_rss:.1f}, at start {start_rss:.1f},"
                    f" whole run {run_peak:.1f})"
                )
            else:
                rss_text = f"{rss:.0f}"
            print(
                f"| {name} | {med[name]:.0f} ({min(v):.0f}-{max(v):.0f}) | "
                f"{med[name] / med['nginx']:.2f} | {med[name] / med['nginx-sendfile']:.2f} | "
                f"{statistics.median(cpu[name]):.2f} | {rss_text} |"
            )
        print("\nproject: " + " ".join(project.argv).replace(str(work), "$WORK"))
        print("nginx:   " + " ".join(nginx.argv).replace(str(work), "$WORK"))
        print(
            f"curl:    curl -sS -o /dev/null -w '%{{http_code}} %{{size_download}} "
            f"%{{time_total}}' URL   (project: {url.split('/', 3)[3]})"
        )
    finally:
        for server in (nginx, project):
            if server is not None:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

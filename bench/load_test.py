#!/usr/bin/env python3
"""
Load test of the transcoder service on loopback, in two phases.

1. Uploads under polling: ROUNDS times, UPLOADS concurrent uploads of SIZE MiB, mixed
   (curl -T with a length, curl -T - sent chunked, curl -F multipart), while
   POLLERS clients poll GET /jobs/<id> in a loop.  Checks: every upload 201,
   its sha256 as the server reported it and as stored on disk equal to the
   file's; no poll failed.  Reports: poll latency p50/p99/max (target p99 <=
   100 ms), the server's peak RSS (target <= 120 MiB), aggregate MB/s.

2. A queue: JOBS jobs of a fast profile (ffmpeg copying a 1 s clip) uploaded
   back to back to a server with --workers 2.  Checks: all succeed; never more
   than 2 encoders at once (children of the server sampled in /proc every few
   ms); jobs start in the order they were created.

Everything runs on 127.0.0.1 with kernel-chosen ports and a temporary data
dir; every wait is bounded, and the script stops its servers itself.  Exit
status 0 when every check passed and every target was met, 1 otherwise.

usage: load_test.py [--quick] [--uploads N] [--size-mib M] [--rounds R] [--pollers P]
                    [--poll-interval S] [--jobs J] [--workers W] [--json FILE]
                    [--workdir DIR] [--keep] [--python PY]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
RSS_TARGET_MIB = 120
P99_TARGET_MS = 100
FINISHED = ("succeeded", "failed", "cancelled")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the server -------------------------------------------------------------


class Server:
    """C{transcoder serve} on a kernel-chosen loopback port, its output in a file."""

    def __init__(self, python: str, data: Path, logfile: Path, *args: str) -> None:
        self.data = data
        self.logfile = logfile
        argv = [python, "-m", "transcoder.cli", "serve", "--listen", "tcp:0:interface=127.0.0.1"]
        argv += ["--data-dir", str(data), *args]
        out = logfile.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + 30
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{logfile.read_text(errors='replace')}")
            m = re.search(r"starting on (\d+)", logfile.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
            time.sleep(0.05)
        if not self.port:
            self.stop()
            raise SystemExit("server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status_bytes(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def children(self) -> list[tuple[int, str]]:
        """(pid, command name) of the server's child processes."""
        out = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                pids = (task / "children").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    out.append((int(pid), Path(f"/proc/{pid}/comm").read_text().strip()))
                except OSError:
                    pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def request(server: Server, method: str, target: str, body: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request(method, target, body=body)
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        conn.close()


# -- inputs -----------------------------------------------------------------


def make_payload(path: Path, size: int, seed: int) -> str:
    """C{size} bytes, different for each seed and each MiB; returns their sha256."""
    block = os.urandom(MiB)
    h = hashlib.sha256()
    with path.open("wb") as f:
        for i in range((size + MiB - 1) // MiB):
            chunk = (seed.to_bytes(4, "little") + i.to_bytes(4, "little") + block[8:])[
                : min(MiB, size - i * MiB)
            ]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def make_clip(path: Path) -> None:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=1",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-shortest", str(path)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


FAST_PROFILE = """
[copy-fast]
description = "Copy the streams into Matroska: the cheapest job that runs a real encoder."
executable = "ffmpeg"
argv = ["-nostdin", "-y", "-v", "error", "-i", "{file}", "-c", "copy", "-f", "matroska",
        "{output}"]
output_extension = "mkv"
media_type = "video/x-matroska"
timeout = 60
"""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# -- pollers (in a process of their own, so their CPU does not skew ours) -----


async def _poll(
    port: int,
    job_id: str,
    interval: float,
    stop: Any,
    lat: list[tuple[float, float]],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = f"GET /jobs/{job_id} HTTP/1.1\r\nHost: load\r\n\r\n".encode()
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            # (start, latency): CLOCK_MONOTONIC is one clock for all processes.
            lat.append((t0, time.monotonic() - t0))
            if not head.startswith(b"HTTP/1.1 200") or json.loads(body)["id"] != job_id:
                errors.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            if interval:
                await asyncio.sleep(interval)
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()


def poller_main(
    port: int, ids: list[str], clients: int, interval: float, stop: Any, out: Any
) -> None:
    lat: list[tuple[float, float]] = []
    errors: list[str] = []

    async def main() -> None:
        await asyncio.gather(
            *(_poll(port, ids[i % len(ids)], interval, stop, lat, errors) for i in range(clients))
        )

    started = time.monotonic()
    asyncio.run(main())
    out.send({"latencies": lat, "errors": errors, "seconds": time.monotonic() - started})
    out.close()


# -- phase 1 ----------------------------------------------------------------


def curl_upload(kind: str, path: Path, url: str, name: str) -> list[str]:
    base = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    if kind == "raw":
        return [*base, "-T", str(path), f"{url}/jobs?profile=avi-mpeg4&filename={name}"]
    if kind == "chunked":
        return [*base, "-T", "-", f"{url}/jobs?profile=avi-mpeg4&filename={name}"]
    return [*base, "-F", "profile=avi-mpeg4", "-F", f"file=@{path};filename={name}",
            f"{url}/jobs"]  # fmt: skip


def phase_uploads(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n, size = args.uploads, args.size_mib * MiB
    log(f"phase 1: making {n} payloads of {args.size_mib} MiB")
    payloads: list[tuple[Path, str]] = []
    for i in range(n):
        p = work / f"payload-{i}.bin"
        payloads.append((p, make_payload(p, size, i)))
    server = Server(
        args.python, work / "data-uploads", work / "server-uploads.log",
        "--workers", "1", "--max-upload-size", "4G", "--min-free-disk", "0",
        "--idle-timeout", "60s",
    )  # fmt: skip
    result: dict[str, Any] = {
        "uploads": n,
        "size_mib": args.size_mib,
        "pollers": args.pollers,
        "poll_interval_s": args.poll_interval,
        "rounds": args.rounds,
    }
    failures: list[str] = []
    try:
        clip = (work / "clip.mp4").read_bytes()
        seeds = []
        for _ in range(4):
            status, job = request(server, "PUT", "/jobs?profile=avi-mpeg4", clip)
            assert status == 201, job
            seeds.append(job["id"])
        time.sleep(0.5)
        rss_idle = server.status_bytes("VmRSS")
        exact_peak = server.reset_peak()
        peak_sampled = [rss_idle]
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.wait(0.05):
                try:
                    peak_sampled[0] = max(peak_sampled[0], server.status_bytes("VmRSS"))
                except (OSError, KeyError):
                    return

        threading.Thread(target=sample_rss, daemon=True).start()

        ctx = mp.get_context("fork")
        stop = ctx.Event()
        recv, send = ctx.Pipe(duplex=False)
        poller = ctx.Process(
            target=poller_main,
            args=(server.port, seeds, args.pollers, args.poll_interval, stop, send),
        )
        poller.start()
        time.sleep(1.0)

        kinds = ["raw", "chunked", "multipart"]
        windows: list[tuple[float, float]] = []
        stored_ok = 0
        for round_ in range(args.rounds):
            log(
                f"phase 1, round {round_ + 1}/{args.rounds}: {n} uploads (raw, chunked, "
                f"multipart) beside {args.pollers} pollers"
            )
            procs = []
            started = time.monotonic()
            for i, (path, _) in enumerate(payloads):
                kind = kinds[i % 3]
                stdin = path.open("rb") if kind == "chunked" else subprocess.DEVNULL
                procs.append(
                    (kind, subprocess.Popen(
                        curl_upload(kind, path, server.url, f"load-{i}.bin"),
                        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    ))
                )  # fmt: skip
            outcomes = []
            for kind, proc in procs:
                try:
                    out, err = proc.communicate(timeout=max(60, n * args.size_mib / 10))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                outcomes.append((kind, out, err))
            windows.append((started, time.monotonic()))
            # Checked (and the stored copies removed) between rounds, not during them.
            for (kind, out, err), (path, digest) in zip(outcomes, payloads, strict=True):
                body, _, code = out.decode(errors="replace").rpartition("\n")
                if code != "201":
                    failures.append(
                        f"{kind} upload of {path.name}: HTTP {code} {body[:200]} {err!r}"
                    )
                    continue
                job = json.loads(body)
                reported = job["inputs"][0]["sha256"]
                stored = list((server.data / "jobs" / job["id"]).glob("input-file*"))
                if reported != digest:
                    failures.append(f"{kind} upload of {path.name}: server reported {reported}")
                elif len(stored) != 1 or sha256_file(stored[0]) != digest:
                    failures.append(f"{kind} upload of {path.name}: stored file differs")
                else:
                    stored_ok += 1
                request(server, "DELETE", f"/jobs/{job['id']}")
        time.sleep(0.5)
        stop.set()
        polled = recv.recv() if recv.poll(60) else {"latencies": [], "errors": ["no report"]}
        poller.join(30)
        sampling.set()
        peak = server.status_bytes("VmHWM") if exact_peak else peak_sampled[0]
        peak = max(peak, peak_sampled[0])
        wall = sum(end - start for start, end in windows)

        # Only the polls sent while uploads ran count.
        lat = sorted(d for t, d in polled["latencies"] if any(a <= t <= b for a, b in windows))
        if not lat:
            failures.append("no poll completed")
        if polled["errors"]:
            failures.append(f"{len(polled['errors'])} polls failed: {polled['errors'][:5]}")
        result.update(
            stored_ok=stored_ok,
            upload_wall_s=round(wall, 2),
            upload_mb_s=round(args.rounds * n * size / 1e6 / wall, 1),
            polls=len(lat),
            poll_errors=len(polled["errors"]),
            polls_per_s=round(len(lat) / wall, 1),
            poll_p50_ms=round(statistics.median(lat) * 1000, 2) if lat else None,
            poll_p99_ms=round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2) if lat else None,
            poll_max_ms=round(lat[-1] * 1000, 2) if lat else None,
            rss_idle_mib=round(rss_idle / MiB, 1),
            rss_peak_mib=round(peak / MiB, 1),
            rss_peak_exact=exact_peak,
        )
    finally:
        server.stop()
    tracebacks = server.logfile.read_text(errors="replace").count("Traceback")
    if tracebacks:
        failures.append(f"{tracebacks} tracebacks in {server.logfile}")
    result["failures"] = failures
    result["targets"] = {
        "poll_p99_ms<=100": result.get("poll_p99_ms") is not None
        and result["poll_p99_ms"] <= P99_TARGET_MS,
        "rss_peak_mib<=120": result.get("rss_peak_mib", 1e9) <= RSS_TARGET_MIB,
    }
    return result


# -- phase 2 ----------------------------------------------------------------


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def phase_queue(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    profiles = work / "fast.toml"
    profiles.write_text(FAST_PROFILE)
    server = Server(
        args.python, work / "data-queue", work / "server-queue.log",
        "--workers", str(args.workers), "--profiles", str(profiles), "--min-free-disk", "0",
        "--max-queued", str(max(1000, args.jobs + 10)),
    )  # fmt: skip
    result: dict[str, Any] = {"jobs": args.jobs, "workers": args.workers}
    failures: list[str] = []
    try:
        clip = (work / "clip.mp4").read_bytes()
        encoders_max = [0]
        samples = [0]
        sampling = threading.Event()

        def sample() -> None:
            # env execs setsid, which execs the encoder, all in place: "env" and
            # "setsid" for an instant each, then "ffmpeg".
            while not sampling.wait(0.003):
                try:
                    stages = ("ffmpeg", "setsid", "env")
                    running = [c for c in server.children() if c[1] in stages]
                except OSError:
                    return
                samples[0] += 1
                encoders_max[0] = max(encoders_max[0], len(running))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log(f"phase 2: {args.jobs} jobs to a server with --workers {args.workers}")
        started = time.monotonic()
        ids: list[str] = []
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for i in range(args.jobs):
            conn.request("PUT", f"/jobs?profile=copy-fast&filename=q{i}.mp4", body=clip)
            r = conn.getresponse()
            doc = json.loads(r.read())
            if r.status != 201:
                failures.append(f"upload {i}: HTTP {r.status} {doc}")
                break
            ids.append(doc["id"])
        conn.close()
        uploaded = time.monotonic() - started

        deadline = time.monotonic() + max(120, args.jobs * 3)
        jobs: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            _, listing = request(server, "GET", "/jobs?limit=500")
            jobs = {j["id"]: j for j in listing["jobs"]}
            if all(jobs.get(i, {}).get("state") in FINISHED for i in ids):
                break
            time.sleep(0.25)
        took = time.monotonic() - started
        sampling.set()
        sampler.join(5)

        states: dict[str, int] = {}
        for i in ids:
            state = jobs.get(i, {}).get("state", "missing")
            states[state] = states.get(state, 0) + 1
        if states.get("succeeded", 0) != args.jobs:
            bad = [jobs.get(i, {}).get("error") for i in ids if jobs.get(i, {}).get("state")
                   != "succeeded"][:3]  # fmt: skip
            failures.append(f"not all jobs succeeded: {states}; e.g. {bad}")
        started_at = [_ts(jobs[i]["started_at"]) for i in ids if jobs.get(i, {}).get("started_at")]
        out_of_order = sum(1 for a, b in pairwise(started_at) if b < a)
        if out_of_order or len(started_at) != len(ids):
            failures.append(f"{out_of_order} jobs started before one created earlier")
        if encoders_max[0] > args.workers:
            failures.append(f"{encoders_max[0]} encoders at once with --workers {args.workers}")
        if encoders_max[0] == 0:
            failures.append("the sampler never saw an encoder")
        result.update(
            states=states,
            upload_s=round(uploaded, 2),
            total_s=round(took, 2),
            jobs_per_s=round(args.jobs / took, 2),
            encoders_max=encoders_max[0],
            encoder_samples=samples[0],
            started_out_of_order=out_of_order,
        )
    finally:
        server.stop()
    tracebacks = server.logfile.read_text(errors="replace").count("Traceback")
    if tracebacks:
        failures.append(f"{tracebacks} tracebacks in {server.logfile}")
    result["failures"] = failures
    return result


# -- main -------------------------------------------------------------------


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 x 16 MiB, 10 pollers, 20 jobs")
    ap.add_argument("--uploads", type=int, default=16)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--poll-interval", type=float, default=0.1,
                    help="seconds each poller waits between polls (0: back to back)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="times the uploads are repeated")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--workdir", type=Path, help="where payloads and data dirs go (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--python", default=default_python(), help="python that has transcoder")
    ap.add_argument("--phase", choices=["all", "uploads", "queue"], default="all")
    args = ap.parse_args()
    if args.quick:
        args.uploads, args.size_mib, args.pollers, args.jobs, args.rounds = 4, 16, 10, 20, 1

    for tool in ("curl", "ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="transcoder-load-", dir=args.workdir))
    need = 2 * args.uploads * args.size_mib * MiB + 512 * MiB
    if args.phase != "queue" and shutil.disk_usage(work).free < need:
        print(f"error: {work} needs {need / MiB:.0f} MiB free", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"quick": args.quick, "cpus": os.cpu_count()}
    try:
        make_clip(work / "clip.mp4")
        if args.phase in ("all", "uploads"):
            results["uploads"] = phase_uploads(args, work)
            # The payloads and stored copies are big: gone before the next phase.
            shutil.rmtree(work / "data-uploads", ignore_errors=True)
            for p in work.glob("payload-*.bin"):
                p.unlink()
        if args.phase in ("all", "queue"):
            results["queue"] = phase_queue(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    ok = True
    print()
    if "uploads" in results:
        u = results["uploads"]
        print(f"uploads: {u['rounds']} rounds of {u['uploads']} x {u['size_mib']} MiB (raw, "
              f"chunked, multipart) beside {u['pollers']} pollers, "
              f"each polling every {u['poll_interval_s']} s")  # fmt: skip
        print(f"  stored with the right sha256: {u.get('stored_ok')}/{u['uploads'] * u['rounds']}, "
              f"{u.get('upload_mb_s')} MB/s in all ({u.get('upload_wall_s')} s)")  # fmt: skip
        print(f"  polls during the uploads: {u.get('polls')} ({u.get('polls_per_s')}/s), "
              f"errors {u.get('poll_errors')}, p50 {u.get('poll_p50_ms')} ms, "
              f"p99 {u.get('poll_p99_ms')} ms "
              f"(target <= {P99_TARGET_MS}), max {u.get('poll_max_ms')} ms")  # fmt: skip
        print(f"  server RSS: idle {u.get('rss_idle_mib')} MiB, peak {u.get('rss_peak_mib')} MiB "
              f"(target <= {RSS_TARGET_MIB})")  # fmt: skip
        for name, met in u["targets"].items():
            if not met:
                print(f"  TARGET MISSED: {name}")
                ok = False
        for f in u["failures"]:
            print(f"  FAILED: {f}")
            ok = False
    if "queue" in results:
        q = results["queue"]
        print(f"queue: {q['jobs']} jobs, --workers {q['workers']}: {q.get('states')} "
              f"in {q.get('total_s')} s ({q.get('jobs_per_s')} jobs/s)")  # fmt: skip
        print(f"  most encoders at once: {q.get('encoders_max')} "
              f"({q.get('encoder_samples')} samples); started out of order: "
              f"{q.get('started_out_of_order')}")  # fmt: skip
        for f in q["failures"]:
            print(f"  FAILED: {f}")
            ok = False
    results["ok"] = ok
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Chunked and multipart uploads, measured the way upload_bench.py measures curl -T.

usage: upload_variants.py SIZE_MIB ROUNDS target[,target...] [variant[,variant...]]
variants (default both):
  chunked    curl -T - with the file on stdin: no Content-Length, Transfer-Encoding: chunked
  multipart  curl -F file=@FILE (POST, multipart/form-data), only for targets that parse it:
             project, and aiohttp (peers/aiohttp_multipart.py, aiohttp's MultipartReader).
             nginx's DAV module takes no POST, and stock twisted.web parses a multipart body
             in memory (several times the body's size), so both are left out.
targets: nginx aiohttp twisted-naive project, started fresh for each variant so that the
peak RSS belongs to that variant. The columns are upload_bench.py's: MB/s median (min-max)
and ratio to the first target, server CPU s/GiB, server peak RSS MiB (+growth over the RSS
after the warm-up round).
Environment as for upload_bench.py (PEER_PY, PROJECT_CMD, PROJECT_URL, PROJECT_METHOD), and
  PROJECT_MULTIPART_URL  where the form goes (default: PROJECT_URL's default)
  MULTIPART_FIELD        the file field's name (default: file)
  MULTIPART_EXTRA        more fields, "name=value&name=value" (default: none)
"""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import upload_bench as ub

VARIANTS = ("chunked", "multipart")
MULTIPART_TARGETS = ("aiohttp", "project")
DEFAULT_PROJECT_URL = "http://127.0.0.1:18090/jobs?profile=avi-mpeg4"


class VariantTarget(ub.Target):
    """One server under test, sending bodies in one variant."""

    def __init__(self, name: str, work: str, variant: str) -> None:
        super().__init__(name, work)
        self.variant = variant

    def start(self) -> None:
        if self.variant == "multipart" and self.name == "aiohttp":
            argv = [
                ub.PY,
                os.path.join(ub.HERE, "peers", "aiohttp_multipart.py"),
                "18085",
                self.store,
            ]
            self.port, self.url, self.method = 18085, "http://127.0.0.1:18085/jobs", "POST"
            self.proc = subprocess.Popen(
                argv,
                env=dict(os.environ, STORE=self.store),
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ub.listening(self.port)
            return
        super().start()
        # Something else on the port would answer in its place and be measured instead.
        if self.proc is not None and self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited at start (port {self.port} taken?)")
        if self.variant == "multipart" and self.name == "project":
            self.url = os.environ.get(
                "PROJECT_MULTIPART_URL", os.environ.get("PROJECT_URL", DEFAULT_PROJECT_URL)
            )
            self.method = "POST"

    def command(self, path: str, answer: str) -> list[str]:
        curl = ["curl", "-sS", "-o", answer, "-w", "%{http_code}"]
        if self.variant == "chunked":
            # Size unknown to curl, so HTTP/1.1 sends the body chunked.
            return [*curl, "-X", self.method, "-T", "-", self.url]
        field = os.environ.get("MULTIPART_FIELD", "file")
        extra = [
            a for kv in os.environ.get("MULTIPART_EXTRA", "").split("&") if kv for a in ("-F", kv)
        ]
        return [*curl, *extra, "-F", f"{field}=@{path};type=application/octet-stream", self.url]

    def upload(self, path: str) -> tuple[float, float]:
        self.clear()
        assert self.proc is not None
        c0 = ub.cpu(self.proc.pid)
        answer = os.path.join(self.work, self.name + ".answer")
        with open(path, "rb") as body:
            t = time.perf_counter()
            r = subprocess.run(
                self.command(path, answer), stdin=body, capture_output=True, text=True
            )
            dt = time.perf_counter() - t
        if not r.stdout.strip().startswith("2"):
            raise SystemExit(
                f"{self.name} {self.variant}: HTTP {r.stdout.strip()} {r.stderr.strip()}"
            )
        used = ub.cpu(self.proc.pid) - c0
        if self.name == "project":
            self.settle(answer)
        return dt, used


def run_variant(
    variant: str, names: list[str], src: str, size_mib: int, rounds: int, work: str
) -> None:
    if variant == "multipart":
        names = [n for n in names if n in MULTIPART_TARGETS]
    if not names:
        print(f"{variant}: no target here takes it")
        return
    vwork = os.path.join(work, variant)
    os.makedirs(vwork)
    targets = [VariantTarget(n, vwork, variant) for n in names]
    try:
        for t in targets:
            t.start()
        speed: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        idle: dict[str, float] = {}
        for r in range(rounds + 1):  # round 0 is a warm-up
            for t in targets:
                dt, c = t.upload(src)
                if r:
                    speed[t.name].append(size_mib * 1048576 / dt / 1e6)
                    cpus[t.name].append(c / (size_mib / 1024))
                else:
                    assert t.proc is not None
                    idle[t.name] = ub.status(t.proc.pid, "VmRSS")
        how = "curl -T - (chunked)" if variant == "chunked" else "curl -F (multipart)"
        base = statistics.median(speed[names[0]])
        print(
            f"upload {size_mib} MiB x{rounds}, {how}; MB/s median (min-max); ratio to {names[0]}; "
            f"server cpu s/GiB; server peak RSS MiB (+growth over warm-up)"
        )
        for t in targets:
            assert t.proc is not None
            v = speed[t.name]
            peak = ub.status(t.proc.pid, "VmHWM")
            print(
                f"{t.name:14s} {statistics.median(v):8.0f} ({min(v):.0f}-{max(v):.0f})"
                f"  x{statistics.median(v) / base:5.2f}"
                f"  cpu {statistics.median(cpus[t.name]):5.2f}"
                f"  rss {peak:.0f} (+{peak - idle[t.name]:.0f})"
            )
    finally:
        for t in targets:
            t.stop()
        shutil.rmtree(vwork, ignore_errors=True)


def main() -> None:
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    size_mib, rounds, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    variants = sys.argv[4].split(",") if len(sys.argv) == 5 else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v}")
    if "raw" in names:
        raise SystemExit("raw has no HTTP, so no variants: leave it out")
    # A SIGTERM (make interrupted) must still stop the servers through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="upvariants-")
    try:
        src = os.path.join(work, "src.bin")
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size_mib):
                f.write(block)
        for i, v in enumerate(variants):
            if i:
                print()
            run_variant(v, names, src, size_mib, rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

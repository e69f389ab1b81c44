"""
What the checkpoints of a long tus PATCH cost: one 1 GiB PATCH with curl against
a server with them as shipped (1 s / 64 MiB), with 64 MiB only, 16 MiB only and
none, ROUNDS times each; the time of the PATCH and the time the spool's thread
spent in FileWriter.sync (the drain, the staged bytes, the fdatasync).

    PYTHONPATH=$PWD .venv/bin/python bench/tus_checkpoint_bench.py [ROUNDS]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serverproc import LISTEN, ServerProcess
from tusraw import call, metadata

SIZE = 1 << 30
VARIANTS = {
    "none": "t.CHECKPOINT_SECONDS = 1e9; t.CHECKPOINT_BYTES = 1 << 62",
    "1s+64MiB": "pass",
    "64MiB": "t.CHECKPOINT_SECONDS = 1e9",
    "16MiB": "t.CHECKPOINT_SECONDS = 1e9; t.CHECKPOINT_BYTES = 16 << 20",
}
# Counts the time in FileWriter.sync and prints it after each call.
PROBE = """
import time
import transcoder.http.writer as w
import transcoder.http.tusbody as t
_sync = w.FileWriter.sync
_total = [0.0, 0]
def sync(self):
    start = time.perf_counter()
    size = _sync(self)
    _total[0] += time.perf_counter() - start
    _total[1] += 1
    print(f"SYNCS {_total[1]} {_total[0] * 1000:.1f}", flush=True)
    return size
w.FileWriter.sync = sync
"""


def one(work: Path, source: Path, setting: str) -> tuple[float, str]:
    data = Path(tempfile.mkdtemp(dir=work))
    code = f"{PROBE}\n{setting}\nfrom transcoder.cli import main\nraise SystemExit(main())"
    argv = [sys.executable, "-c", code, "serve", "--listen", LISTEN, "--data-dir", str(data)]
    srv = ServerProcess(data, argv=[*argv, "--workers", "0", "--max-upload-size", "2G"])
    try:
        srv.wait_healthy()
        meta = metadata(profile="mp4-h264", filename="a.flv")
        a = call(
            srv.port, "POST", "/uploads", {"Upload-Length": str(SIZE), "Upload-Metadata": meta}
        )
        headers = ["Tus-Resumable: 1.0.0", "Upload-Offset: 0"]
        headers.append("Content-Type: application/offset+octet-stream")
        curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH"]
        curl += [x for h in headers for x in ("-H", h)]
        start = time.perf_counter()
        r = subprocess.run([*curl, "-T", str(source), srv.url + a["Location"]],
                           capture_output=True, text=True, check=False)  # fmt: skip
        took = time.perf_counter() - start
        assert r.stdout == "204", r
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)
    syncs = [line.split("SYNCS ")[1] for line in srv.lines if "SYNCS " in line]
    n, ms = syncs[-1].split() if syncs else ("0", "0")
    return took, f"{n} syncs, {ms} ms in them"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    work = Path(tempfile.mkdtemp(prefix="tus-checkpoint-bench-"))
    try:
        source = work / "1g.bin"
        with source.open("wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, setting in VARIANTS.items():
                took, syncs = one(work, source, setting)
                times[name].append(took)
                print(f"{name:10s} {took:.2f} s  {syncs}", flush=True)
        for name, v in times.items():
            median = statistics.median(v)
            print(f"{name:10s} median {median:.2f} s (min {min(v):.2f}, max {max(v):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""
The service run as a real process for tests: C{transcoder serve}, C{twistd
transcoder}, C{twistd -y tap.py} or C{twistd web --class ...}, each on a
loopback port the kernel picks (read back from the log), with helpers to read
its memory and to find encoders it left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
LISTEN = "tcp:0:interface=127.0.0.1"
_PORT = re.compile(r"[Ss]ite starting on (\d+)")


def twistd() -> str:
    path = BIN / "twistd"
    return str(path) if path.exists() else "twistd"


def transcoder() -> str:
    path = BIN / "transcoder"
    return str(path) if path.exists() else "transcoder"


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status_kib(self, key: str) -> int:
        """A C{VmHWM}/C{VmRSS} figure of the server process, in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def reset_peak(self) -> None:
        """Start a new peak-RSS measurement (C{VmHWM} := current RSS)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start(
    argv: list[str],
    data_dir: Path,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30,
) -> ServerProcess:
    """Start C{argv}; return once it answers C{GET /health} on the port it logged."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    full_env.update(env or {})
    out = log.open("wb")
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=str(cwd or log.parent),
    )
    out.close()
    server = ServerProcess(proc, data_dir, log, env=full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}:\n{server.log_text()}")
        m = _PORT.search(server.log_text())
        if m:
            server.port = int(m.group(1))
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return server
            except OSError:
                pass
        time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"{argv[0]} did not start:\n{server.log_text()}")


def serve(data_dir: Path, log: Path, *extra: str) -> ServerProcess:
    return start(
        [transcoder(), "serve", "--listen", LISTEN, "--data-dir", str(data_dir), *extra],
        data_dir,
        log,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain C{text} (e.g. a data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def random_file(path: Path, size: int) -> Path:
    """C{size} random bytes (a fresh chunk per MiB, so nothing compresses or repeats)."""
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    return path

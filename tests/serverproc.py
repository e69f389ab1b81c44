"""
The service run as a real process for end-to-end tests, on a loopback port
the kernel picks (read back from its log): C{transcoder serve} through
L{ServerProcess} or L{serve}, or any command line that starts it (C{twistd
transcoder}, C{twistd -y tap.py}, C{twistd web --class ...}) through
L{start}.  With helpers to read its memory and to find processes it left
behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
LISTEN = "tcp:0:interface=127.0.0.1"
# Twisted's listening port logs "<factory> starting on <port>" ("<factory> (TLS)
# starting on <port>" on an ssl: endpoint); the factory is a Site.
_PORT = re.compile(r"[Ss]ite (?:\(TLS\) )?starting on (\d+)")


def twistd() -> str:
    """The C{twistd} of the interpreter running the tests."""
    path = BIN / "twistd"
    return str(path) if path.exists() else "twistd"


def transcoder() -> str:
    """The C{transcoder} command of the interpreter running the tests."""
    path = BIN / "transcoder"
    return str(path) if path.exists() else "transcoder"


def proc_status(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ServerProcess:
    """
    C{python -m transcoder.cli serve} (or C{command}) on an ephemeral loopback
    port, in a session of its own.  Its output is kept in C{self.output} for
    assertions and failure reports, and also written to C{log} when given.

    @param argv: the whole command line, used as it is, for a server that
        is not started by C{serve} with C{args}; it must listen on a port
        the kernel picks.
    """

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        argv: Sequence[str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
        timeout: float = 30,
    ) -> None:
        self.data_dir = data_dir
        self.log = log
        if argv is None:
            argv = list(command) if command else [sys.executable, "-m", "transcoder.cli", "serve"]
            argv += ["--listen", LISTEN, "--data-dir", str(data_dir), *args]
        elif args or command:
            raise TypeError("argv is the whole command line: no args or command with it")
        # Opened here, so that a log that cannot be written fails the start, not the reader.
        self._log_file = log.open("w") if log is not None else None
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self._port is None:
            self.stop()
            raise RuntimeError(f"{argv[0]} did not start:\n{self.output}")
        self.url = f"http://127.0.0.1:{self._port}"
        self.port = self._port

    def _read(self) -> None:
        assert self.proc.stdout is not None
        out = self._log_file
        try:
            for line in self.proc.stdout:
                self.lines.append(line)
                if out is not None:
                    out.write(line)
                    out.flush()
                m = _PORT.search(line)
                if m and self._port is None:
                    self._port = int(m.group(1))
                    self._ready.set()
        finally:
            if out is not None:
                out.close()
            self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def log_text(self) -> str:
        """Everything the server printed so far (all of it once it was stopped)."""
        return self.output

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def peak_rss(self) -> int:
        return proc_status(self.pid, "VmHWM")

    def reset_peak(self) -> bool:
        """Start a new peak-RSS measurement; False where that is not allowed."""
        return reset_peak_rss(self.pid)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_healthy(self, timeout: float = 30) -> None:
        """Return once C{GET /health} answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server never answered /health with 200:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._drain()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9 the server alone (not its encoders, which run in sessions of their own)."""
        self.proc.kill()
        self.proc.wait()
        self._drain()

    def _drain(self) -> None:
        # The output ends when every holder of the pipe has exited: the server
        # and, rarely, a child that inherited it, which is not waited for long.
        self._reader.join(5)


def _clean_env(env: dict[str, str] | None) -> dict[str, str]:
    """The tests' environment without their TRANSCODER_* settings, plus C{env}."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    full.update(env or {})
    return full


def start(
    argv: list[str],
    data_dir: Path,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30,
) -> ServerProcess:
    """
    Start the command line C{argv}, in C{log}'s directory and without the
    tests' C{TRANSCODER_*} settings; return once it answers C{GET /health}.
    """
    server = ServerProcess(
        data_dir, argv=argv, env=_clean_env(env), log=log, cwd=cwd or log.parent, timeout=timeout
    )
    server.wait_healthy(timeout)
    return server


def serve(
    data_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """C{transcoder serve} on C{data_dir} with C{extra} options (and C{env}), as L{start} starts it."""
    return start(
        [transcoder(), "serve", "--listen", LISTEN, "--data-dir", str(data_dir), *extra],
        data_dir,
        log,
        env=env,
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


def no_uploads_left(data_dir: Path) -> bool:
    """Whether nothing of an upload in progress is left in a server's data dir."""
    uploads = data_dir / "uploads"
    return not uploads.exists() or not any(uploads.iterdir())


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05
) -> bool:
    """Poll C{predicate} until it is true or C{timeout} seconds pass; whether it became true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())

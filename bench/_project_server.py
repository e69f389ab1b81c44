"""`transcoder serve` on a port the kernel picks, for the engine and download benches."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
_PORT = re.compile(r"[Ss]ite starting on (\d+)")


class ProjectServer:
    """The project's server with its data in C{work}/data and its log in C{work}/server.log."""

    def __init__(self, work: Path, *extra: str) -> None:
        self.log = work / "server.log"
        self.data_dir = work / "data"
        self.argv = [
            str(BIN / "transcoder"),
            "serve",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--data-dir",
            str(self.data_dir),
            *extra,
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = _PORT.search(self.log.read_text(errors="replace"))
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit("the server did not start:\n" + self.log.read_text(errors="replace"))

    def cpu(self) -> float:
        """user+sys CPU seconds of the server process itself (its encoders are not counted)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)

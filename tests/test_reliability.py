"""
Slow and broken clients against a real server with a short idle timeout (2 s):
one that sends its headers a byte at a time, one that stops mid-body, one
whose body comes slower than the idle timeout allows.  Each is cut off, its
partial file removed, and an ordinary upload running beside dozens of them
takes about as long as it does alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, wait_for

MiB = 1 << 20
IDLE = 2.0
HEAD = b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("slow") / "data",
        *("--idle-timeout", f"{IDLE:g}s", "--workers", "1", "--min-free-disk", "0"),
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output, srv.output


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "normal.bin"
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for i in range(64):
            f.write(i.to_bytes(8, "little") + block[8:])
    return path


def staged(server: ServerProcess) -> list[Path]:
    uploads = server.data_dir / "uploads"
    return [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []


class SlowClient:
    """
    One misbehaving connection, run on its own thread until the server closes
    it or C{limit} seconds pass.

      - C{headers}: the request head, a byte every C{pause} seconds;
      - C{stall}: the head and 64 KiB of body, then nothing;
      - C{dribble}: the head, then 4 KiB of body every C{pause} seconds.
    """

    def __init__(self, port: int, kind: str, pause: float, limit: float) -> None:
        self.kind = kind
        self.pause = pause
        self.limit = limit
        self.cut_after: float | None = None
        self.sent = 0
        self.received = b""
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _closed_within(self, seconds: float) -> bool:
        self._sock.settimeout(seconds)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            return True
        self.received += data
        # An answer (an error) followed by the close counts as being cut off too.
        return data == b"" or self._closed_within(seconds)

    def _send(self, data: bytes) -> bool:
        try:
            self._sock.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def _run(self) -> None:
        start = time.monotonic()
        if self.kind == "headers":
            steps = [HEAD[i : i + 1] for i in range(len(HEAD))] + [b"x"] * 10_000
        elif self.kind == "stall":
            steps = [HEAD + os.urandom(64 * 1024)]
        else:
            steps = [HEAD] + [os.urandom(4096)] * 10_000
        for step in steps:
            if not self._send(step) or self._closed_within(self.pause):
                self.cut_after = time.monotonic() - start
                break
            if time.monotonic() - start > self.limit:
                break
        if self.cut_after is None and self.kind == "stall":
            if self._closed_within(self.limit):
                self.cut_after = time.monotonic() - start
        self._sock.close()

    def join(self) -> None:
        self._thread.join(self.limit + 10)


def test_headers_a_byte_at_a_time_are_cut_off(server: ServerProcess) -> None:
    """A client that sends its request head a byte every half second (never idle for the idle timeout) gets a JSON 408 and is disconnected once the head has taken an idle timeout."""
    fds = server.open_fds()
    client = SlowClient(server.port, "headers", pause=0.5, limit=3 * IDLE + 1)
    client.join()
    assert client.cut_after is not None, f"still connected after {client.sent} bytes"
    assert IDLE - 0.5 <= client.cut_after <= IDLE + 1, client.cut_after
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), client.received[:200]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert wait_for(lambda: server.open_fds() <= fds)


def test_keep_alive_client_pausing_between_requests_is_served(server: ServerProcess) -> None:
    """The head deadline runs per request: a keep-alive client that pauses less than the idle timeout between requests, longer than one in all, gets every answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}\n"):
                chunk = s.recv(65536)
                assert chunk, "closed between requests"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(IDLE * 0.75)


@pytest.mark.parametrize(
    ("kind", "pause"),
    [("stall", IDLE), ("dribble", IDLE + 1.5)],
    ids=["stops mid-body", "body slower than the idle timeout"],
)
def test_slow_body_is_cut_off_and_its_partial_file_removed(
    server: ServerProcess, kind: str, pause: float
) -> None:
    """A body that stops, or comes with gaps longer than the idle timeout, is cut off about one idle timeout after its last byte; its partial file and staging directory go, and so does its fd."""
    fds = server.open_fds()
    jobs = server.data_dir / "jobs"
    jobs_before = set(jobs.iterdir())
    client = SlowClient(server.port, kind, pause=pause, limit=20)
    assert wait_for(lambda: staged(server) != [], timeout=5), "the body never reached the disk"
    client.join()
    assert client.cut_after is not None, f"{kind}: never cut off"
    # The head and the first bytes go at once; the cut comes one idle timeout later.
    assert IDLE - 0.5 <= client.cut_after <= IDLE + 3, client.cut_after
    assert wait_for(
        lambda: (
            not (server.data_dir / "uploads").exists()
            or not any((server.data_dir / "uploads").iterdir())
        )
    )
    assert set(jobs.iterdir()) == jobs_before
    assert wait_for(lambda: server.open_fds() <= fds)


def _upload(server: ServerProcess, path: Path) -> tuple[float, dict[str, object]]:
    start = time.monotonic()
    r = subprocess.run(
        ["curl", "-sS", "-f", "-T", str(path), f"{server.url}/jobs?profile=avi-mpeg4"],
        capture_output=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    return took, json.loads(r.stdout)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def test_normal_upload_beside_slow_clients_is_not_slowed(
    server: ServerProcess, payload: Path
) -> None:
    """A 64 MiB upload alongside 60 slow clients (20 of each kind) is stored whole, takes at most about three times as long as alone, and the slow bodies are all cut off and their files removed."""
    alone, _ = _upload(server, payload)
    alone = min(alone, _upload(server, payload)[0])

    clients = [
        SlowClient(server.port, kind, pause=pause, limit=limit)
        for kind, pause, limit in (
            ("headers", 0.5, 5.0),
            ("stall", IDLE, 12.0),
            ("dribble", IDLE + 1.5, 12.0),
        )
        for _ in range(20)
    ]
    assert wait_for(lambda: len(staged(server)) >= 40, timeout=10), len(staged(server))
    beside, job = _upload(server, payload)
    print(f"64 MiB upload: {alone:.2f} s alone, {beside:.2f} s beside 60 slow clients")
    assert beside <= 3 * alone + 1.0, (alone, beside)
    inputs = job["inputs"]
    assert isinstance(inputs, list)
    want = _sha256(payload)
    assert inputs[0]["sha256"] == want
    (stored,) = (server.data_dir / "jobs" / str(job["id"])).glob("input-file*")
    assert _sha256(stored) == want

    for client in clients:
        client.join()
    bodies = [c for c in clients if c.kind != "headers"]
    assert all(c.cut_after is not None for c in bodies), [c.cut_after for c in bodies]
    assert wait_for(lambda: staged(server) == [])

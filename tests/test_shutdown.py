"""SIGTERM stops the service gracefully: no new connections, uploads under way get a grace period."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from serverproc import ServerProcess, wait_for

BODY = 4 << 20


def start_upload(server: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"PUT /jobs?profile=avi-mpeg4&filename=late.flv HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n" % BODY
    )
    s.sendall(os.urandom(BODY // 2))
    return s


def test_upload_under_way_finishes_within_the_grace(tmp_path: Path) -> None:
    """An upload in flight at SIGTERM may finish and gets its 201; the port is closed meanwhile; the server then exits 0."""
    server = ServerProcess(tmp_path, "--shutdown-grace", "20s", "--workers", "1")
    s = start_upload(server)
    assert wait_for(lambda: any((tmp_path / "uploads").rglob("input-*")))
    server.proc.send_signal(signal.SIGTERM)
    # No new connections once stopping...
    assert wait_for(lambda: _refused(server.port), timeout=10)
    # ...but the upload under way completes.
    s.sendall(os.urandom(BODY - BODY // 2))
    s.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201"), data[:300]
    job = json.loads(body)
    assert job["inputs"][0]["size"] == BODY
    assert server.proc.wait(30) == 0
    assert (tmp_path / "jobs" / job["id"]).is_dir()


def test_upload_past_the_grace_is_cut_off_and_removed(tmp_path: Path) -> None:
    """An upload still unfinished when the grace ends is cut off, its partial file removed, and the server exits."""
    server = ServerProcess(tmp_path, "--shutdown-grace", "1s", "--workers", "1")
    s = start_upload(server)
    assert wait_for(lambda: any((tmp_path / "uploads").rglob("input-*")))
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 15
    s.settimeout(5)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()
    assert not any((tmp_path / "uploads").rglob("*"))
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True

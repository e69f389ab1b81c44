"""
Disk space on a small data dir goes to the bytes that arrive, not to what a
client declares: a slow client that announces 60 MB on a 64 MiB tmpfs and
sends 70 KB now and then holds about 8 MiB of it, and a 10 MB upload beside
it succeeds (issue 14, finding 4).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tmpfs
from serverproc import ServerProcess, wait_for

from transcoder.http.writer import ALLOCATION_STEP

MiB = 1 << 20
KB = 1000


@pytest.fixture
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with tmpfs(tmp_path_factory.mktemp("tmpfs"), "64m") as mountpoint:
        yield mountpoint


def put(url: str, data: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=data, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _staged(uploads: Path) -> list[Path]:
    return [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []


def test_a_slow_client_declaring_60_mb_does_not_block_a_10_mb_upload(small_disk: Path) -> None:
    """64 MiB tmpfs, --max-upload-size 60M --min-free-disk 1M: a raw-socket client declares Content-Length 60000000 and sends 70 KB at a time; while it lingers its file holds at most one 8 MiB allocation step (not 60 MB), a 10 MB upload beside it gets 201, and once it hangs up nothing of it is left."""
    server = ServerProcess(
        small_disk / "data",
        *("--max-upload-size", "60M", "--min-free-disk", "1M", "--workers", "1"),
    )
    uploads = small_disk / "data" / "uploads"
    slow = socket.create_connection(("127.0.0.1", server.port))
    try:
        slow.sendall(
            b"PUT /jobs?profile=mp4-h264 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 60000000\r\n\r\n" + os.urandom(70 * KB)
        )
        assert wait_for(lambda: len(_staged(uploads)) == 1), server.output
        (slow_file,) = _staged(uploads)
        slow.sendall(os.urandom(70 * KB))
        assert wait_for(lambda: slow_file.stat().st_blocks > 0)
        held = slow_file.stat().st_blocks * 512
        assert held <= ALLOCATION_STEP + MiB, held

        status, job = put(f"{server.url}/jobs?profile=mp4-h264", os.urandom(10_000_000))
        assert status == 201, job

        # Still there, still taking bytes, still holding one step.
        slow.sendall(os.urandom(70 * KB))
        assert slow_file.exists()
        assert slow_file.stat().st_blocks * 512 <= ALLOCATION_STEP + MiB
    finally:
        slow.close()
    try:
        assert wait_for(lambda: _staged(uploads) == []), _staged(uploads)
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output

"""
tus uploads across two real `transcoder serve` nodes on one PostgreSQL
database and one shared data dir, in raw HTTP: an upload begun on one node
is finished on the other, a PATCH in flight on one is taken over from the
other, and a node killed mid-PATCH does not keep the upload.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from serverproc import ServerProcess, serve, wait_for
from tusraw import OCTETS, Answer, call, connect, metadata, request_bytes

if TYPE_CHECKING:
    from conftest import Clips


@pytest.fixture
def two_nodes(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Nodes a and b (no workers: jobs stay queued) on one database and data dir."""
    data = tmp_path / "data"
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            srv = serve(data, tmp_path / f"{name}.log", "--store", pg_dsn, "--node-name", name,
                        "--workers", "0", "--max-upload-size", "64M")  # fmt: skip
            started.append(srv)
        yield started[0], started[1]
    finally:
        for srv in started:
            srv.stop()


def create(node: ServerProcess, length: int, **meta: str) -> str:
    a = call(node.port, "POST", "/uploads", {
        "Upload-Length": str(length),
        "Upload-Metadata": metadata(**(meta or {"profile": "mp4-h264", "filename": "a.flv"})),
    })  # fmt: skip
    assert a.status == 201, a.body
    return a["Location"]


def patch(node: ServerProcess, loc: str, offset: int, data: bytes) -> Answer:
    return call(node.port, "PATCH", loc, {**OCTETS, "Upload-Offset": str(offset)}, data)


def head(node: ServerProcess, loc: str) -> Answer:
    return call(node.port, "HEAD", loc)


def job_of(node: ServerProcess, location: str) -> dict[str, object]:
    a = call(node.port, "GET", location, tus=False)
    assert a.status == 200, a.body
    job: dict[str, object] = a.json()
    return job


def jobs_in_database(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM jobs").fetchone()
    assert row is not None
    return int(row[0])


def test_begun_on_one_node_finished_on_the_other(
    two_nodes: tuple[ServerProcess, ServerProcess], clips: Clips, pg_dsn: str
) -> None:
    """Half an upload PATCHed to node a; node b's HEAD reports that offset, b hashes the bytes on disk and takes the rest; one job is made, with the file's SHA-256; both nodes HEAD the finished upload and name the same Job-Location, and a retried last PATCH on a names it too; a terminated upload is gone from both; both nodes exit 0 on SIGTERM."""
    a, b = two_nodes
    data = clips.flv_video.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    loc = create(a, len(data), profile="mp4-h264", filename="v.flv", sha256=sha)
    half = len(data) // 2
    assert patch(a, loc, 0, data[:half]).status == 204
    seen = head(b, loc)
    assert seen.status == 200 and seen["Upload-Offset"] == str(half)
    done = patch(b, loc, half, data[half:])
    assert done.status == 204, done.body
    assert done["Upload-Offset"] == str(len(data))
    job_loc = done["Job-Location"]
    assert "hashing its" in b.output
    assert head(a, loc)["Job-Location"] == job_loc
    assert head(b, loc)["Job-Location"] == job_loc
    again = patch(a, loc, half, data[half:])
    assert again.status == 409 and again["Job-Location"] == job_loc
    for node in (a, b):
        inputs = job_of(node, job_loc)["inputs"]
        assert isinstance(inputs, list) and inputs[0]["sha256"] == sha
    assert jobs_in_database(pg_dsn) == 1
    # The terminated id: 404 or 410 on either node, and nothing left on disk.
    other = create(b, 10)
    assert call(a.port, "DELETE", other).status == 204
    assert head(b, other).status in (404, 410)
    assert not (a.data_dir / "tus" / other.rsplit("/", 1)[1]).exists()
    # Their upload store and lock threads end with them on SIGTERM, an upload under way or not.
    half_done = create(a, 10)
    assert patch(b, half_done, 0, b"12345").status == 204
    assert a.stop(timeout=10) == 0 and b.stop(timeout=10) == 0


def _stuck_patch(node: ServerProcess, loc: str, data: bytes, sent: int) -> socket.socket:
    sock = connect(node.port)
    h = {"Tus-Resumable": "1.0.0", **OCTETS, "Upload-Offset": "0"}
    sock.sendall(request_bytes("PATCH", loc, h, len(data)) + data[:sent])
    return sock


def _file(node: ServerProcess, loc: str) -> Path:
    return node.data_dir / "tus" / loc.rsplit("/", 1)[1]


def test_a_patch_in_flight_on_one_node_is_taken_over_from_the_other(
    two_nodes: tuple[ServerProcess, ServerProcess],
) -> None:
    """A HEAD on node b for an upload whose PATCH is stuck mid-body on node a stops that PATCH (a hears b's NOTIFY) and answers within seconds with what a wrote; b then finishes the upload and the SHA-256 is right."""
    a, b = two_nodes
    data = os.urandom(8 << 20)
    loc = create(a, len(data))
    sent = 3 << 20
    stuck = _stuck_patch(a, loc, data, sent)
    try:
        upload_dir = _file(a, loc)
        assert wait_for(lambda: any(f.stat().st_size for f in upload_dir.iterdir()), timeout=10)
        started = time.monotonic()
        seen = head(b, loc)
        assert seen.status == 200 and time.monotonic() - started < 8
        kept = int(seen["Upload-Offset"])
        assert 0 < kept <= sent
        upload_file = next(upload_dir.iterdir())
        assert upload_file.stat().st_size == kept
        assert upload_file.read_bytes() == data[:kept]
    finally:
        stuck.close()
    done = patch(b, loc, kept, data[kept:])
    assert done.status == 204, done.body
    inputs = job_of(a, done["Job-Location"])["inputs"]
    assert isinstance(inputs, list)
    assert inputs[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_node_killed_mid_patch_does_not_keep_the_upload(
    two_nodes: tuple[ServerProcess, ServerProcess],
) -> None:
    """kill -9 of node a while its PATCH is mid-body: node b's HEAD gets the upload within seconds (the dead session's lock is gone), at the offset a last recorded (its first PATCH's end, or a later checkpoint's), and b finishes it with the right SHA-256."""
    a, b = two_nodes
    data = os.urandom(4 << 20)
    loc = create(a, len(data))
    first = 1 << 20
    assert patch(a, loc, 0, data[:first]).status == 204
    stuck = connect(a.port)
    try:
        h = {"Tus-Resumable": "1.0.0", **OCTETS, "Upload-Offset": str(first)}
        stuck.sendall(request_bytes("PATCH", loc, h, len(data) - first) + data[first : 2 << 20])
        upload_file = next(_file(a, loc).iterdir())
        assert wait_for(lambda: upload_file.stat().st_size > first, timeout=10)
        a.kill()
        started = time.monotonic()
        seen = head(b, loc)
        assert seen.status == 200 and time.monotonic() - started < 8
    finally:
        stuck.close()
    # What a recorded: its first PATCH, and what a checkpoint of the one it
    # was killed in may have recorded (at most the bytes sent).
    kept = int(seen["Upload-Offset"])
    assert first <= kept <= 2 << 20
    done = patch(b, loc, kept, data[kept:])
    assert done.status == 204, done.body
    inputs = job_of(b, done["Job-Location"])["inputs"]
    assert isinstance(inputs, list)
    assert inputs[0]["sha256"] == hashlib.sha256(data).hexdigest()

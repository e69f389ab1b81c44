"""
What a tus upload keeps through faults, with a real server on loopback in
raw HTTP: a server killed (-9) in the middle of a long PATCH keeps what its
checkpoints recorded, a SIGTERM just after a client went keeps that PATCH's
bytes, an empty PATCH at the end of a finished upload is answered as the last
one was; and, in-process, a PATCH whose offset another request moved on
meanwhile answers 409 without moving it back.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
import pytest_twisted
from serverproc import ServerProcess, wait_for
from tusraw import OCTETS, call, connect, metadata, request_bytes
from twisted.internet import reactor

from transcoder.core.profiles import builtin_profiles
from transcoder.core.registry import JobRegistry
from transcoder.core.uploads import InProcessUploadLocks, MemoryUploadStore, Upload, new_upload_id
from transcoder.http.errors import APIError
from transcoder.http.tusupload import TusUploads
from transcoder.testing import FakeExecutor, MemoryStore

ARGS = ("--max-upload-size", "64M", "--workers", "0")


def create(srv: ServerProcess, length: int) -> str:
    h = {
        "Upload-Length": str(length),
        "Upload-Metadata": metadata(profile="mp4-h264", filename="a.flv"),
    }
    a = call(srv.port, "POST", "/uploads", h)
    assert a.status == 201, a.body
    return a["Location"]


def recorded_offset(data_dir: Path, loc: str) -> int:
    """The offset in the server's SQLite store, read beside it (a HEAD would take the upload over)."""
    with sqlite3.connect(data_dir / "jobs.sqlite3", timeout=10) as conn:
        (offset,) = conn.execute(
            "SELECT offset FROM uploads WHERE id = ?", (loc.rsplit("/", 1)[1],)
        ).fetchone()
    return int(offset)


def upload_file(data_dir: Path, loc: str) -> Path:
    (path,) = (data_dir / "tus" / loc.rsplit("/", 1)[1]).iterdir()
    return path


def finish_and_check(srv: ServerProcess, loc: str, data: bytes) -> None:
    """HEAD, resume from its offset to the end: the job has the whole file's SHA-256."""
    h = call(srv.port, "HEAD", loc)
    assert h.status == 200
    offset = int(h["Upload-Offset"])
    done = call(srv.port, "PATCH", loc, {**OCTETS, "Upload-Offset": str(offset)}, data[offset:])
    assert done.status == 204, done.body
    job = call(srv.port, "GET", done["Job-Location"], tus=False).json()
    assert job["inputs"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_kill_mid_patch_keeps_what_its_checkpoints_recorded(tmp_path: Path) -> None:
    """kill -9 of the server in the middle of a long PATCH: after a restart on the same data dir, HEAD reports an offset above the PATCH's start and no further than the bytes sent (a checkpoint recorded it while the PATCH ran), the file holds exactly those bytes up to it, and resuming from it makes the job with the whole file's SHA-256."""
    data = os.urandom(48 << 20)
    srv = ServerProcess(tmp_path, *ARGS)
    sock = None
    try:
        srv.wait_healthy()
        loc = create(srv, len(data))
        sock = connect(srv.port)
        h = {"Tus-Resumable": "1.0.0", **OCTETS, "Upload-Offset": "0"}
        sent = 8 << 20
        sock.sendall(request_bytes("PATCH", loc, h, len(data)) + data[:sent])
        # The client then goes slowly: a checkpoint comes within a second or so.
        assert wait_for(lambda: recorded_offset(tmp_path, loc) > 0, timeout=15)
        sock.sendall(data[sent : sent + (4 << 20)])
        sent += 4 << 20
        srv.kill()
    finally:
        if sock is not None:
            sock.close()
        srv.stop()
    srv = ServerProcess(tmp_path, *ARGS)
    try:
        srv.wait_healthy()
        h = call(srv.port, "HEAD", loc)
        assert h.status == 200
        offset = int(h["Upload-Offset"])
        assert 0 < offset <= sent
        with upload_file(tmp_path, loc).open("rb") as f:
            assert f.read(offset) == data[:offset]
        finish_and_check(srv, loc, data)
    finally:
        srv.stop()


def test_a_sigterm_just_after_a_client_went_keeps_its_patch(tmp_path: Path) -> None:
    """A PATCH cut off by its client, then SIGTERM at once: the service stops only once the cut-off PATCH's offset is recorded, so that after a restart HEAD reports every byte sent, and the upload finishes with the right SHA-256."""
    data = os.urandom(40 << 20)
    srv = ServerProcess(tmp_path, *ARGS)
    try:
        srv.wait_healthy()
        loc = create(srv, len(data))
        sent = 24 << 20
        with connect(srv.port) as sock:
            h = {"Tus-Resumable": "1.0.0", **OCTETS, "Upload-Offset": "0"}
            sock.sendall(request_bytes("PATCH", loc, h, len(data)) + data[:sent])
        path = upload_file(tmp_path, loc)
        tail = data[sent - 4096 : sent]

        def written() -> bool:
            with path.open("rb") as f:
                f.seek(sent - 4096)
                return f.read(4096) == tail

        # SIGTERM once the server has read the last byte (and so seen the
        # connection go), while the PATCH's record may still be on its way.
        assert wait_for(written, timeout=15, interval=0.001)
        srv.stop()
        assert srv.proc.returncode == 0, srv.output
    finally:
        srv.stop()
    assert recorded_offset(tmp_path, loc) == sent
    srv = ServerProcess(tmp_path, *ARGS)
    try:
        srv.wait_healthy()
        h = call(srv.port, "HEAD", loc)
        assert h.status == 200 and h["Upload-Offset"] == str(sent)
        finish_and_check(srv, loc, data)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    srv = ServerProcess(tmp_path_factory.mktemp("tus-durable"), *ARGS)
    srv.wait_healthy()
    yield srv  # type: ignore[misc]
    srv.stop()


def test_an_empty_patch_at_the_end_of_a_finished_upload_answers_its_job(
    server: ServerProcess,
) -> None:
    """An empty PATCH (Content-Length: 0) at the final offset of an upload whose job is made answers 204 with that offset and the job's Job-Location, as the last PATCH did, and makes no second job; a retried last PATCH still gets 409 with the same Job-Location."""
    data = os.urandom(3000)
    loc = create(server, len(data))
    last = call(server.port, "PATCH", loc, {**OCTETS, "Upload-Offset": "0"}, data)
    assert last.status == 204, last.body
    jobs_before = call(server.port, "GET", "/jobs", tus=False).json()["jobs"]
    for _ in range(2):
        a = call(server.port, "PATCH", loc, {**OCTETS, "Upload-Offset": str(len(data))})
        assert a.status == 204, a.body
        assert a["Upload-Offset"] == str(len(data))
        assert a["Job-Location"] == last["Job-Location"]
    again = call(server.port, "PATCH", loc, {**OCTETS, "Upload-Offset": "0"}, data)
    assert again.status == 409 and again["Job-Location"] == last["Job-Location"]
    assert call(server.port, "GET", "/jobs", tus=False).json()["jobs"] == jobs_before
    assert call(server.port, "HEAD", loc)["Job-Location"] == last["Job-Location"]


@pytest_twisted.ensureDeferred
async def test_a_patch_whose_offset_was_moved_on_answers_409(tmp_path: Path) -> None:
    """A PATCH ends after another request (a node that took the upload over when this one lost its lock) recorded a further offset: its conditional record fails, it answers 409 superseded with the offset on record, which stays where the other request put it; the file is not cut back to this PATCH's end."""
    registry = JobRegistry(
        reactor, MemoryStore(), tmp_path, builtin_profiles(), workers=0, executor=FakeExecutor()
    )
    store = MemoryUploadStore()
    uploads = TusUploads(
        reactor, registry, builtin_profiles(), store, InProcessUploadLocks(reactor),
        tmp_path, 1 << 30, 3600.0,
    )  # fmt: skip
    uid = new_upload_id()
    name = uploads.new_file(uid, "file", "a.flv")
    path = uploads.upload_dir(uid) / name
    await store.create(Upload(uid, None, 100, 0, {"profile": "mp4-h264"}, 0.0, 1e12, name))
    prep = await uploads.prepare(uid, None, 0, 40, None, None)
    path.write_bytes(b"a" * 60)
    # Meanwhile the other node wrote 60 bytes and recorded them.
    assert await store.update_offset(uid, 0, 60, 2e12)
    prep.sha.update(b"a" * 40)
    with pytest.raises(APIError) as e:
        await uploads.patched(prep, 40, False, True)
    assert e.value.status == 409 and e.value.code == "superseded"
    assert e.value.headers["Upload-Offset"] == "60"
    got = await store.get(uid)
    assert got is not None and got.offset == 60
    assert path.stat().st_size == 60
    assert not uploads.locks.held(uid)

"""
tus uploads against faults, with a real server in raw HTTP: a server killed
between storing a job and recording it in its upload (the state that leaves,
made on disk as the kill leaves it), a restart between finishing the inputs
of a multi-input job and the POST /jobs naming them, a full queue at that
POST, CORS on refusals sent before the body, and the jobs of tus uploads
counted as plain uploads' are.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Clips
from serverproc import ServerProcess, wait_for
from tusraw import OCTETS, call, connect, metadata, read_answer, request_bytes

ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("tus-faults")
    srv = ServerProcess(
        data, *("--max-upload-size", "64M", "--workers", "0", "--cors-origin", ORIGIN)
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def upload(srv: ServerProcess, data: bytes, **meta: str) -> tuple[str, dict[str, str]]:
    """Create an upload and send it whole: its id and the last PATCH's headers."""
    h = {"Upload-Length": str(len(data)), "Upload-Metadata": metadata(**meta)}
    a = call(srv.port, "POST", "/uploads", h)
    assert a.status == 201, a.body
    loc = a["Location"]
    p = call(srv.port, "PATCH", loc, {**OCTETS, "Upload-Offset": "0"}, data)
    assert p.status == 204, p.body
    return loc.rsplit("/", 1)[1], p.headers


def jobs_listed(srv: ServerProcess) -> list[dict[str, object]]:
    a = call(srv.port, "GET", "/jobs", tus=False)
    assert a.status == 200
    jobs: list[dict[str, object]] = a.json()["jobs"]
    return jobs


def counter(srv: ServerProcess, name: str) -> float:
    text = call(srv.port, "GET", "/metrics", tus=False).body.decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


def test_refusals_before_the_body_carry_cors_for_allowed_origins(server: ServerProcess) -> None:
    """A 413 sent before the body (POST /uploads past the maximum, PUT /jobs too big) carries Access-Control-Allow-Origin for an allowed origin, so that its page can read it; a foreign origin gets none."""
    too_big = {"Upload-Length": str(65 << 20), "Upload-Metadata": metadata(profile="mp4-h264")}
    a = call(server.port, "POST", "/uploads", {**too_big, "Origin": ORIGIN})
    assert a.status == 413 and a.json()["error"]["code"] == "too_large"
    assert a["Access-Control-Allow-Origin"] == ORIGIN
    assert "Upload-Offset" in a["Access-Control-Expose-Headers"]
    a = call(server.port, "POST", "/uploads", {**too_big, "Origin": "https://evil.example"})
    assert a.status == 413 and "access-control-allow-origin" not in a.headers
    # A plain upload refused from gotLength, its body never read.
    h = {"Origin": ORIGIN, "Expect": "100-continue"}
    with connect(server.port) as sock:
        sock.sendall(request_bytes("PUT", "/jobs?profile=mp4-h264", h, 65 << 20))
        a = read_answer(sock)
    assert a.status == 413 and a["Access-Control-Allow-Origin"] == ORIGIN


def test_a_tus_job_is_counted_as_an_upload(server: ServerProcess, clips: Clips) -> None:
    """A job made from a tus upload counts in transcoder_uploads_total{outcome="created"}, as a plain upload's job does; its bytes stay in transcoder_tus_bytes_total only."""
    created = counter(server, 'transcoder_uploads_total{outcome="created"}')
    body_bytes = counter(server, "transcoder_upload_bytes_total")
    _, h = upload(server, clips.flv_video.read_bytes(), profile="mp4-h264", filename="v.flv")
    assert "job-location" in h
    assert counter(server, 'transcoder_uploads_total{outcome="created"}') == created + 1
    assert counter(server, "transcoder_upload_bytes_total") == body_bytes


def _forge_unrecorded(data_dir: Path, upload_id: str) -> None:
    """What a kill between storing the job and recording it in the upload leaves."""
    conn = sqlite3.connect(data_dir / "jobs.sqlite3")
    with conn:
        conn.execute("UPDATE uploads SET job_id = NULL WHERE id = ?", (upload_id,))
    conn.close()


def test_a_kill_between_the_job_and_its_record_is_reconciled_at_start(
    tmp_path: Path, clips: Clips
) -> None:
    """Killed (-9) after a job was stored but before its upload recorded it: at start the upload's record gets that job (HEAD answers its Job-Location), its leftover files go, and no second job is made."""
    data = clips.flv_video.read_bytes()
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        uid, h = upload(srv, data, profile="mp4-h264", filename="v.flv")
        job_loc = h["job-location"]
        job_id = job_loc.rsplit("/", 1)[1]
    finally:
        srv.kill()
    _forge_unrecorded(tmp_path, uid)
    # The upload's own link to the file is still there at that point.
    job_file = next(f for f in (tmp_path / "jobs" / job_id).iterdir() if f.name.startswith("input"))
    (tmp_path / "tus" / uid).mkdir()
    os.link(job_file, tmp_path / "tus" / uid / job_file.name)

    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        assert wait_for(lambda: not (tmp_path / "tus" / uid).exists(), timeout=15), srv.output
        a = call(srv.port, "HEAD", f"/uploads/{uid}")
        assert a.status == 200 and a["Job-Location"] == job_loc
        assert [j["id"] for j in jobs_listed(srv)] == [job_id]
        assert job_file.read_bytes() == data
    finally:
        srv.stop()


def test_a_job_lost_before_it_was_stored_is_made_again_at_start(
    tmp_path: Path, clips: Clips
) -> None:
    """Killed (-9) with an upload complete whose job never reached the store: at start the job is made from the upload's file (the same job id on every attempt), with the right SHA-256."""
    data = clips.flv_video.read_bytes()
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        uid, h = upload(srv, data, profile="mp4-h264", filename="v.flv")
        job_id = h["job-location"].rsplit("/", 1)[1]
    finally:
        srv.kill()
    # As the kill leaves it before the job's row: the upload unrecorded, its
    # file in tus/, no job (a directory without a row is removed at start).
    _forge_unrecorded(tmp_path, uid)
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    with conn:
        conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    conn.close()
    job_file = next(f for f in (tmp_path / "jobs" / job_id).iterdir() if f.name.startswith("input"))
    (tmp_path / "tus" / uid).mkdir()
    os.link(job_file, tmp_path / "tus" / uid / job_file.name)

    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        assert wait_for(lambda: len(jobs_listed(srv)) == 1, timeout=15), srv.output
        (job,) = jobs_listed(srv)
        assert job["id"] == job_id
        inputs = job["inputs"]
        assert isinstance(inputs, list) and inputs[0]["sha256"] == hashlib.sha256(data).hexdigest()
        a = call(srv.port, "HEAD", f"/uploads/{uid}")
        assert a["Job-Location"] == f"/jobs/{job_id}"
        assert not (tmp_path / "tus" / uid).exists()
    finally:
        srv.stop()


def test_inputs_finished_before_a_restart_make_their_job_after_it(
    tmp_path: Path, clips: Clips
) -> None:
    """Inputs of a mux-avi job uploaded, then the server restarts, then POST /jobs names them: the job is made with each input's SHA-256 (hashed again from disk)."""
    video, audio = clips.flv_video.read_bytes(), clips.mp3_audio.read_bytes()
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        vid, _ = upload(srv, video, input="video", filename="v.flv")
        aid, _ = upload(srv, audio, input="audio", filename="a.mp3")
    finally:
        assert srv.stop() == 0
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        a = call(srv.port, "POST", f"/jobs?profile=mux-avi&upload.video={vid}&upload.audio={aid}",
                 tus=False)  # fmt: skip
        assert a.status == 201, a.body
        sha = {i["name"]: i["sha256"] for i in a.json()["inputs"]}
        assert sha == {
            "video": hashlib.sha256(video).hexdigest(),
            "audio": hashlib.sha256(audio).hexdigest(),
        }
    finally:
        srv.stop()


def test_a_full_queue_at_post_jobs_leaves_the_uploads_usable(tmp_path: Path, clips: Clips) -> None:
    """With --max-queued 1 and a job waiting, POST /jobs naming finished uploads gets 503 queue_full; once the queue has room the same request makes the job."""
    srv = ServerProcess(tmp_path, "--workers", "0", "--max-queued", "1")
    try:
        srv.wait_healthy()
        vid, _ = upload(srv, clips.flv_video.read_bytes(), input="video", filename="v.flv")
        aid, _ = upload(srv, clips.mp3_audio.read_bytes(), input="audio", filename="a.mp3")
        _, h = upload(srv, b"x" * 100, profile="mp4-h264")
        waiting = h["job-location"]
        query = f"/jobs?profile=mux-avi&upload.video={vid}&upload.audio={aid}"
        a = call(srv.port, "POST", query, tus=False)
        assert a.status == 503 and a.json()["error"]["code"] == "queue_full"
        assert a.get("Retry-After")
        assert call(srv.port, "DELETE", waiting, tus=False).status in (200, 204)
        a = call(srv.port, "POST", query, tus=False)
        assert a.status == 201, a.body
    finally:
        srv.stop()

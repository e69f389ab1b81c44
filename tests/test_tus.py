"""
tus 1.0 at /uploads against a real server, in raw HTTP: the behaviours tusd's
handler tests hold a server to, and this server's own (jobs, tokens, the
lock's take-over, a PATCH cut off, a restart).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Clips
from serverproc import ServerProcess, wait_for
from tusraw import OCTETS, call, connect, metadata, request_bytes

ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("tus-data")
    srv = ServerProcess(
        data,
        *("--max-upload-size", "64M", "--workers", "1", "--cors-origin", ORIGIN),
        *("--idle-timeout", "20s"),
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def create(
    server: ServerProcess, length: int | None, meta: str | None = None, **headers: str
) -> str:
    h = {"Upload-Metadata": meta or metadata(profile="mp4-h264", filename="a.flv")}
    if length is None:
        h["Upload-Defer-Length"] = "1"
    else:
        h["Upload-Length"] = str(length)
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    a = call(server.port, "POST", "/uploads", h)
    assert a.status == 201, a.body
    assert a["Location"].startswith("/uploads/")
    return a["Location"]


def patch(
    server: ServerProcess, loc: str, offset: int, data: bytes, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    h = {**OCTETS, "Upload-Offset": str(offset)}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    a = call(server.port, "PATCH", loc, h, data)
    return a.status, a.headers, a.body


def head(server: ServerProcess, loc: str) -> tuple[int, dict[str, str]]:
    a = call(server.port, "HEAD", loc)
    return a.status, a.headers


def job_of(server: ServerProcess, location: str) -> dict[str, object]:
    a = call(server.port, "GET", location, tus=False)
    assert a.status == 200
    job: dict[str, object] = a.json()
    return job


def test_discovery(server: ServerProcess) -> None:
    """OPTIONS /uploads names the version, the extensions (no concatenation), the maximum size and the checksums."""
    a = call(server.port, "OPTIONS", "/uploads", tus=False)
    assert a.status == 204
    assert a["Tus-Resumable"] == "1.0.0" and a["Tus-Version"] == "1.0.0"
    assert a["Tus-Extension"].split(",") == [
        "creation", "creation-with-upload", "creation-defer-length",
        "termination", "expiration", "checksum",
    ]  # fmt: skip
    assert a["Tus-Max-Size"] == str(64 << 20)
    assert a["Tus-Checksum-Algorithm"] == "sha1,sha256,md5"


def test_creation_with_length_and_head(server: ServerProcess) -> None:
    """POST creates an upload at offset 0; HEAD says offset, length, metadata, expiry, no-store."""
    loc = create(server, 100)
    assert len(loc.rsplit("/", 1)[1]) == 40
    status, h = head(server, loc)
    assert status == 200
    assert h["upload-offset"] == "0" and h["upload-length"] == "100"
    assert h["cache-control"] == "no-store" and h["tus-resumable"] == "1.0.0"
    assert "upload-expires" in h and "upload-defer-length" not in h


def test_creation_refusals(server: ServerProcess) -> None:
    """No Tus-Resumable 412; neither length 400; past the maximum 413; unknown profile 422; bad metadata 400."""
    a = call(server.port, "POST", "/uploads", {"Upload-Length": "10"}, tus=False)
    assert a.status == 412 and a["Tus-Resumable"] == "1.0.0"
    assert call(server.port, "POST", "/uploads", {}).status == 400
    a = call(server.port, "POST", "/uploads", {"Upload-Length": str(65 << 20)})
    assert a.status == 413 and a.json()["error"]["code"] == "too_large"
    bad = metadata(profile="no-such-profile")
    a = call(server.port, "POST", "/uploads", {"Upload-Length": "10", "Upload-Metadata": bad})
    assert a.status == 422 and a.json()["error"]["code"] == "unknown_profile"
    a = call(
        server.port, "POST", "/uploads", {"Upload-Length": "10", "Upload-Metadata": "profile !!"}
    )
    assert a.status == 400
    meta = metadata(profile="mp4-h264", crf="999")
    a = call(server.port, "POST", "/uploads", {"Upload-Length": "10", "Upload-Metadata": meta})
    assert a.status == 422
    meta = metadata(profile="mp4-h264", callback_url="file:///etc/passwd")
    a = call(server.port, "POST", "/uploads", {"Upload-Length": "10", "Upload-Metadata": meta})
    assert a.status == 422 and a.json()["error"]["code"] == "invalid_callback_url"


def test_metadata_with_empty_values(server: ServerProcess) -> None:
    """A metadata key without a value is kept with an empty value and given back as a bare key."""
    meta = metadata(profile="mp4-h264", filename="x.flv") + ",filetype,callback_url"
    loc = create(server, 10, meta=meta)
    _, h = head(server, loc)
    pairs = dict([*p.split(" "), ""][:2] for p in h["upload-metadata"].split(","))
    assert pairs["filetype"] == "" and pairs["callback_url"] == ""
    assert base64.b64decode(pairs["filename"]) == b"x.flv"


def test_creation_with_upload_and_its_content_type(server: ServerProcess) -> None:
    """POST with a body writes it (Upload-Offset in the answer); a body of another type is 415."""
    h = {"Upload-Length": "10", "Upload-Metadata": metadata(profile="mp4-h264"), **OCTETS}
    a = call(server.port, "POST", "/uploads", h, b"hello")
    assert a.status == 201 and a["Upload-Offset"] == "5"
    assert head(server, a["Location"])[1]["upload-offset"] == "5"
    h["Content-Type"] = "text/plain"
    assert call(server.port, "POST", "/uploads", h, b"hello").status == 415


def test_patch_chunks_conflicts_and_limits(server: ServerProcess) -> None:
    """PATCH appends; a wrong offset is 409 and changes nothing; past the length 413; wrong type 415; unknown 404."""
    loc = create(server, 10)
    status, h, _ = patch(server, loc, 0, b"abcd")
    assert status == 204 and h["upload-offset"] == "4" and "upload-expires" in h
    status, h, _ = patch(server, loc, 2, b"xx")
    assert status == 409 and h["upload-offset"] == "4"
    assert head(server, loc)[1]["upload-offset"] == "4"
    status, _, _ = patch(server, loc, 4, b"x" * 7)
    assert status == 413
    status, _, _ = patch(server, loc, 4, b"ef", Content_Type="application/octet-stream")
    assert status == 415
    assert head(server, loc)[1]["upload-offset"] == "4"
    status, _, _ = patch(server, "/uploads/" + "0" * 40, 0, b"x")
    assert status == 404
    a = call(server.port, "PATCH", loc, {**OCTETS, "Upload-Offset": "4"}, b"ef", tus=False)
    assert a.status == 412


def test_deferred_length_declared_by_a_later_patch(server: ServerProcess) -> None:
    """An upload created with Upload-Defer-Length: 1 takes its length from a later PATCH's Upload-Length."""
    loc = create(server, None)
    _, h = head(server, loc)
    assert h["upload-defer-length"] == "1" and "upload-length" not in h
    assert patch(server, loc, 0, b"abc")[0] == 204
    assert patch(server, loc, 3, b"de", Upload_Length="20")[0] == 204
    _, h = head(server, loc)
    assert h["upload-length"] == "20" and h["upload-offset"] == "5"


def test_termination(server: ServerProcess) -> None:
    """DELETE terminates (204): the files go, and the id then answers 410."""
    loc = create(server, 10)
    patch(server, loc, 0, b"abc")
    upload_dir = server.data_dir / "tus" / loc.rsplit("/", 1)[1]
    assert upload_dir.is_dir()
    assert call(server.port, "DELETE", loc).status == 204
    assert not upload_dir.exists()
    assert head(server, loc)[0] == 410
    assert patch(server, loc, 3, b"d")[0] == 410


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
def test_checksum_match_and_mismatch(server: ServerProcess, algorithm: str) -> None:
    """A matching Upload-Checksum is accepted; a mismatch is 460, the chunk dropped, the offset unmoved."""
    loc = create(server, 20)
    good = base64.b64encode(hashlib.new(algorithm, b"hello").digest()).decode()
    status, h, _ = patch(server, loc, 0, b"hello", Upload_Checksum=f"{algorithm} {good}")
    assert status == 204 and h["upload-offset"] == "5"
    status, h, _ = patch(server, loc, 5, b"world", Upload_Checksum=f"{algorithm} {good}")
    assert status == 460 and h["tus-resumable"] == "1.0.0"
    assert head(server, loc)[1]["upload-offset"] == "5"
    path = server.data_dir / "tus" / loc.rsplit("/", 1)[1]
    assert [f.stat().st_size for f in path.iterdir()] == [5]
    status, _, _ = patch(server, loc, 5, b"world", Upload_Checksum="crc32 AAAA")
    assert status == 400


def test_finished_upload_becomes_one_job(server: ServerProcess, clips: Clips) -> None:
    """The last PATCH answers Job-Location; HEAD again gives the same job; the job has the file's SHA-256."""
    data = clips.flv_video.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    meta = metadata(profile="mp4-h264", filename="v.flv", sha256=sha)
    loc = create(server, len(data), meta=meta)
    half = len(data) // 2
    assert patch(server, loc, 0, data[:half])[0] == 204
    status, h, _ = patch(server, loc, half, data[half:])
    assert status == 204 and h["upload-offset"] == str(len(data))
    job_loc = h["job-location"]
    assert head(server, loc)[1]["job-location"] == job_loc
    # The last PATCH retried: nothing more is written, the same job is named.
    status, h, _ = patch(server, loc, half, data[half:])
    assert status == 409 and h["job-location"] == job_loc
    job = job_of(server, job_loc)
    inputs = job["inputs"]
    assert isinstance(inputs, list) and inputs[0]["sha256"] == sha
    assert not (server.data_dir / "tus" / loc.rsplit("/", 1)[1]).exists()


def test_wrong_sha256_metadata_is_refused_at_the_end(server: ServerProcess) -> None:
    """An upload whose bytes do not hash to its sha256 metadata makes no job: 400 digest_mismatch."""
    loc = create(server, 4, meta=metadata(profile="mp4-h264", sha256="0" * 64))
    status, _, body = patch(server, loc, 0, b"abcd")
    assert status == 400 and b"digest_mismatch" in body
    assert head(server, loc)[0] in (404, 410)


def test_method_override(server: ServerProcess) -> None:
    """POST with X-HTTP-Method-Override: PATCH (or DELETE) acts as that method."""
    loc = create(server, 10)
    h = {**OCTETS, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"}
    a = call(server.port, "POST", loc, h, b"abc")
    assert a.status == 204 and a["Upload-Offset"] == "3"
    a = call(server.port, "POST", loc, {"X-HTTP-Method-Override": "DELETE"})
    assert a.status == 204
    assert head(server, loc)[0] == 410


def test_cors_preflight_and_exposed_headers(server: ServerProcess) -> None:
    """A preflight from an allowed origin gets 200 with the tus headers allowed; answers expose Upload-Offset, Location, Job-Location."""
    h = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type",
    }
    a = call(server.port, "OPTIONS", "/uploads/" + "a" * 40, h, tus=False)
    assert a.status == 200
    assert a["Access-Control-Allow-Origin"] == ORIGIN
    allowed = a["Access-Control-Allow-Headers"].lower()
    assert "upload-offset" in allowed and "tus-resumable" in allowed
    assert "PATCH" in a["Access-Control-Allow-Methods"]
    a = call(server.port, "OPTIONS", "/jobs", h, tus=False)
    assert a.status == 200
    a = call(
        server.port,
        "POST",
        "/uploads",
        {"Origin": ORIGIN, "Upload-Length": "5", "Upload-Metadata": metadata(profile="mp4-h264")},
    )
    exposed = a["Access-Control-Expose-Headers"]
    for name in ("Upload-Offset", "Location", "Upload-Length", "Upload-Expires", "Job-Location"):
        assert name in exposed
    a = call(server.port, "OPTIONS", "/uploads", {**h, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in a.headers


def test_patch_cut_off_keeps_what_arrived_then_resumes(server: ServerProcess) -> None:
    """A PATCH cut off after 6 MiB keeps those bytes (HEAD says so); resuming from there gives the right SHA-256."""
    data = os.urandom(10 << 20)
    loc = create(server, len(data))
    cut = 6 << 20
    with connect(server.port) as sock:
        h = {"Tus-Resumable": "1.0.0", **OCTETS, "Upload-Offset": "0"}
        sock.sendall(request_bytes("PATCH", loc, h, len(data)) + data[:cut])
        # Half-closed: the server reads every byte sent, meets the end, and
        # closes (a HEAD sent before that would take the upload over sooner).
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(20)
        while sock.recv(65536):
            pass
    assert head(server, loc)[1]["upload-offset"] == str(cut)
    status, h2, _ = patch(server, loc, cut, data[cut:])
    assert status == 204
    job = job_of(server, h2["job-location"])
    inputs = job["inputs"]
    assert isinstance(inputs, list)
    assert inputs[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_new_request_takes_over_a_patch_in_flight(server: ServerProcess) -> None:
    """A HEAD on an upload whose PATCH is stuck mid-body stops that PATCH and answers within seconds, with what it wrote."""
    data = os.urandom(8 << 20)
    loc = create(server, len(data))
    sent = 3 << 20
    with connect(server.port) as stuck:
        h = {"Tus-Resumable": "1.0.0", **OCTETS, "Upload-Offset": "0"}
        stuck.sendall(request_bytes("PATCH", loc, h, len(data)) + data[:sent])
        assert wait_for(
            lambda: (server.data_dir / "tus" / loc.rsplit("/", 1)[1]).exists(), timeout=5
        )
        started = time.monotonic()
        status, hh = head(server, loc)
        assert status == 200 and time.monotonic() - started < 8
        # What the PATCH had written when it was stopped (the rest of what was
        # sent may still be in the socket's buffers): durably on disk.
        kept = int(hh["upload-offset"])
        assert 0 < kept <= sent
        upload_file = next((server.data_dir / "tus" / loc.rsplit("/", 1)[1]).iterdir())
        assert upload_file.stat().st_size == kept
        assert upload_file.read_bytes() == data[:kept]
        # The old connection was dropped: its answer (if any) came, then EOF.
        stuck.settimeout(10)
        try:
            while stuck.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    status, h2, _ = patch(server, loc, kept, data[kept:])
    assert status == 204
    inputs = job_of(server, h2["job-location"])["inputs"]
    assert isinstance(inputs, list)
    assert inputs[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_resume_after_a_restart_hashes_the_file_again(tmp_path: Path) -> None:
    """A server with an upload under way stops on SIGTERM; after a restart the upload is still there; the next PATCH hashes its bytes on disk, and the job's SHA-256 is right."""
    data = os.urandom(3 << 20)
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        loc = create(srv, len(data))
        assert patch(srv, loc, 0, data[: 1 << 20])[0] == 204
    finally:
        # SIGTERM ends it (the upload store's writer thread is stopped too).
        assert srv.stop(timeout=10) == 0
    srv = ServerProcess(tmp_path, "--workers", "0")
    try:
        srv.wait_healthy()
        assert head(srv, loc)[1]["upload-offset"] == str(1 << 20)
        status, h, _ = patch(srv, loc, 1 << 20, data[1 << 20 :])
        assert status == 204
        inputs = job_of(srv, h["job-location"])["inputs"]
        assert isinstance(inputs, list)
        assert inputs[0]["sha256"] == hashlib.sha256(data).hexdigest()
        assert "hashing its" in srv.output
    finally:
        srv.stop()


def test_uploads_belong_to_their_token(tmp_path: Path) -> None:
    """With tokens, an upload is invisible (404) to another token; without a token, 401 before any byte."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:aaaaaaaaaaaaaaaaaaaaaaaa\nbob:bbbbbbbbbbbbbbbbbbbbbbbb\n")
    srv = ServerProcess(tmp_path / "data", "--tokens", str(tokens), "--workers", "0")
    try:
        srv.wait_healthy()
        alice = {"Authorization": "Bearer aaaaaaaaaaaaaaaaaaaaaaaa"}
        bob = {"Authorization": "Bearer bbbbbbbbbbbbbbbbbbbbbbbb"}
        meta = {"Upload-Length": "5", "Upload-Metadata": metadata(profile="mp4-h264")}
        assert call(srv.port, "POST", "/uploads", meta).status == 401
        a = call(srv.port, "POST", "/uploads", {**meta, **alice})
        assert a.status == 201
        loc = a["Location"]
        assert call(srv.port, "HEAD", loc, alice).status == 200
        assert call(srv.port, "HEAD", loc, bob).status == 404
        h = {**bob, **OCTETS, "Upload-Offset": "0"}
        assert call(srv.port, "PATCH", loc, h, b"abc").status == 404
        assert call(srv.port, "DELETE", loc, bob).status == 404
    finally:
        srv.stop()


def upload_input(server: ServerProcess, path: Path, role: str) -> str:
    """One input of a multi-input job: uploaded with input=<role> and no profile."""
    data = path.read_bytes()
    meta = metadata(input=role, filename=path.name)
    loc = create(server, len(data), meta=meta)
    status, h, _ = patch(server, loc, 0, data)
    assert status == 204 and "job-location" not in h
    return loc.rsplit("/", 1)[1]


def test_multi_input_job_from_uploads(server: ServerProcess, clips: Clips) -> None:
    """FLV video and MP3 audio uploaded with input=video/audio, then POST /jobs?profile=mux-avi&upload.video=..&upload.audio=.. makes one AVI job; the uploads cannot be used twice."""
    video = upload_input(server, clips.flv_video, "video")
    audio = upload_input(server, clips.mp3_audio, "audio")
    query = f"/jobs?profile=mux-avi&upload.video={video}&upload.audio={audio}"
    a = call(server.port, "POST", query, tus=False)
    assert a.status == 201, a.body
    job = a.json()
    inputs = {i["name"]: i for i in job["inputs"]}
    assert inputs["video"]["sha256"] == hashlib.sha256(clips.flv_video.read_bytes()).hexdigest()
    assert inputs["audio"]["sha256"] == hashlib.sha256(clips.mp3_audio.read_bytes()).hexdigest()
    assert not (server.data_dir / "tus" / video).exists()
    assert call(server.port, "POST", query, tus=False).status == 409
    assert wait_for(
        lambda: job_of(server, a["Location"])["state"] in ("succeeded", "failed"), timeout=60
    )
    done = job_of(server, a["Location"])
    assert done["state"] == "succeeded", done
    result = call(server.port, "GET", a["Location"] + "/result", tus=False)
    assert result.status == 200 and result.body[:4] == b"RIFF" and result.body[8:11] == b"AVI"


def test_multi_input_job_refusals(server: ServerProcess, clips: Clips) -> None:
    """A missing role 422, an upload not yet complete 409, an unknown upload 404, and a multi-input profile at POST /uploads 422."""
    video = upload_input(server, clips.flv_video, "video")
    a = call(server.port, "POST", f"/jobs?profile=mux-avi&upload.video={video}", tus=False)
    assert a.status == 422
    loc = create(server, 100, meta=metadata(input="audio"))
    partial = loc.rsplit("/", 1)[1]
    q = f"/jobs?profile=mux-avi&upload.video={video}&upload.audio={partial}"
    assert call(server.port, "POST", q, tus=False).status == 409
    q = f"/jobs?profile=mux-avi&upload.video={video}&upload.audio={'0' * 40}"
    assert call(server.port, "POST", q, tus=False).status == 404
    a = call(
        server.port,
        "POST",
        "/uploads",
        {"Upload-Length": "10", "Upload-Metadata": metadata(profile="mux-avi")},
    )
    assert a.status == 422 and a.json()["error"]["code"] == "needs_inputs"


def test_expired_uploads_are_swept_and_counted(tmp_path: Path) -> None:
    """With --upload-expiry 2s an abandoned upload's files go and its id answers 410; the metrics count it, and an empty PATCH leaves the PATCHes-in-flight gauge at 0."""
    srv = ServerProcess(tmp_path, "--workers", "0", "--upload-expiry", "2s")
    try:
        srv.wait_healthy()
        loc = create(srv, 100)
        status, h, _ = patch(srv, loc, 0, b"abc")
        assert status == 204 and "upload-expires" in h
        # An empty PATCH is no PATCH in flight, before or after.
        assert patch(srv, loc, 3, b"")[0] == 204
        upload_dir = tmp_path / "tus" / loc.rsplit("/", 1)[1]
        assert upload_dir.is_dir()
        assert wait_for(lambda: head(srv, loc)[0] == 410, timeout=15)
        assert not upload_dir.exists()
        metrics = call(srv.port, "GET", "/metrics", tus=False).body.decode()
        assert 'transcoder_tus_uploads_total{event="created"} 1.0' in metrics
        assert 'transcoder_tus_uploads_total{event="expired"} 1.0' in metrics
        assert "transcoder_tus_bytes_total 3.0" in metrics
        assert "transcoder_tus_patches_in_flight 0.0" in metrics
    finally:
        srv.stop()


def test_answers_conform_to_the_openapi_spec(server: ServerProcess) -> None:
    """Real tus answers (discovery, creation, HEAD, PATCH, 409, 412, 460, DELETE) are what docs/openapi.yaml declares, headers included."""
    import yaml
    from openapi_core import OpenAPI
    from openapi_core.testing import MockRequest, MockResponse
    from openapi_core.validation.response.exceptions import MissingData

    spec = OpenAPI.from_dict(
        yaml.safe_load((Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text())
    )

    def conform(method: str, path: str, a: object) -> None:
        from tusraw import Answer

        assert isinstance(a, Answer)
        request = MockRequest("http://127.0.0.1:8080", method.lower(), path)
        response = MockResponse(
            a.body, a.status, headers=a.headers, content_type=a.headers.get("content-type", "")
        )
        try:
            spec.validate_response(request, response)
        except MissingData:
            # An error's JSON body is not sent with HEAD: its headers still counted.
            assert method == "head" and a.body == b""

    conform("options", "/uploads", call(server.port, "OPTIONS", "/uploads", tus=False))
    h = {"Upload-Length": "6", "Upload-Metadata": metadata(profile="mp4-h264"), **OCTETS}
    a = call(server.port, "POST", "/uploads", h, b"abc")
    conform("post", "/uploads", a)
    loc = a["Location"]
    conform("head", loc, call(server.port, "HEAD", loc))
    h = {**OCTETS, "Upload-Offset": "0"}
    conform("patch", loc, call(server.port, "PATCH", loc, h, b"d"))
    conform("patch", loc, call(server.port, "PATCH", loc, h, b"d", tus=False))
    bad = {**OCTETS, "Upload-Offset": "3", "Upload-Checksum": "md5 " + "A" * 22 + "=="}
    conform("patch", loc, call(server.port, "PATCH", loc, bad, b"d"))
    conform("patch", loc, call(server.port, "PATCH", loc, {**OCTETS, "Upload-Offset": "3"}, b"d"))
    conform("delete", loc, call(server.port, "DELETE", loc))
    conform("head", loc, call(server.port, "HEAD", loc))


def test_bytes_on_a_finished_upload_and_an_empty_patch_below_it(
    server: ServerProcess, clips: Clips
) -> None:
    """A PATCH with bytes at the end of a finished upload is 403 finished (not 413); an empty PATCH to a path below an upload's is 404, as any unknown path, and does not act on the upload."""
    data = clips.flv_video.read_bytes()
    loc = create(server, len(data), meta=metadata(profile="mp4-h264", filename="v.flv"))
    status, h, _ = patch(server, loc, 0, data)
    assert status == 204 and "job-location" in h
    status, h, body = patch(server, loc, len(data), b"more")
    assert status == 403 and b'"finished"' in body and h["tus-resumable"] == "1.0.0"
    # The empty PATCH that at loc itself answers 204 with its Job-Location.
    assert patch(server, loc, len(data), b"")[0] == 204
    status, h, body = patch(server, loc + "/x", len(data), b"")
    assert status == 404 and b'"not_found"' in body and "job-location" not in h
    deferred = create(server, None)
    assert patch(server, deferred + "/x", 0, b"", Upload_Length="10")[0] == 404
    assert head(server, deferred)[1]["upload-defer-length"] == "1"

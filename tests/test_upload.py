"""
Uploads against a real server on a loopback port: bodies land on disk as they
arrive, in bounded memory, and bad requests are refused with JSON errors
before the body is read, leaving nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, reset_peak_rss, wait_for

MiB = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, size: int) -> Path:
    """Random-looking bytes without spending seconds in os.urandom."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            chunk = (i.to_bytes(8, "little") + block)[: min(MiB, size - written)]
            f.write(chunk)
            written += len(chunk)
            i += 1
    return path


def curl(*args: str) -> tuple[int, dict[str, object], str]:
    """Run curl; return (status, JSON body, stderr)."""
    r = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), (json.loads(body) if body.strip() else {}), r.stderr


def stored_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != "encoder.log")


def leftovers(data_dir: Path) -> list[Path]:
    """Anything an upload left behind outside of finished jobs."""
    uploads = data_dir / "uploads"
    return sorted(uploads.rglob("*")) if uploads.exists() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("data")
    # One worker: the garbage inputs fail their probe at once, and encoders stay out of the way.
    srv = ServerProcess(data, "--max-upload-size", "300M", "--workers", "1", "--idle-timeout", "3s")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_file(tmp_path_factory.mktemp("big") / "big.flv", 256 * MiB)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_file(tmp_path_factory.mktemp("small") / "clip.flv", 3 * MiB + 12345)


def job_input(server: ServerProcess, job: dict[str, object], index: int = 0) -> Path:
    inputs = job["inputs"]
    assert isinstance(inputs, list)
    name = inputs[index]["name"]
    (path,) = (server.data_dir / "jobs" / str(job["id"])).glob(f"input-{name}*")
    return path


def assert_memory_bounded(server: ServerProcess, run) -> None:  # type: ignore[no-untyped-def]
    before = server.rss()
    if not reset_peak_rss(server.pid):
        before = max(before, server.peak_rss())
    run()
    growth = server.peak_rss() - before
    print(f"server RSS growth: {growth / MiB:.1f} MiB")
    assert growth < 40 * MiB, f"server RSS grew by {growth / MiB:.1f} MiB"


def test_raw_put_256mib_streams_to_disk_in_bounded_memory(server: ServerProcess, big: Path) -> None:
    """curl -T of 256 MiB: 201 with the job; the stored bytes and the reported sha256 match; RSS grows < 40 MiB."""
    result: dict[str, object] = {}

    def run() -> None:
        result["r"] = curl("-T", str(big), f"{server.url}/jobs?profile=avi-mpeg4&filename=big.flv")

    assert_memory_bounded(server, run)
    status, job, err = result["r"]  # type: ignore[misc]
    assert status == 201, (job, err)
    want = sha256_file(big)
    assert job["inputs"][0]["sha256"] == want
    assert job["inputs"][0]["size"] == big.stat().st_size
    assert job["inputs"][0]["filename"] == "big.flv"
    assert sha256_file(job_input(server, job)) == want


def test_multipart_256mib_streams_each_part_to_its_file(server: ServerProcess, big: Path) -> None:
    """curl -F of 256 MiB: the file part is written to its input file as it arrives; RSS grows < 40 MiB."""
    result: dict[str, object] = {}

    def run() -> None:
        result["r"] = curl("-F", "profile=avi-mpeg4", "-F", f"file=@{big}", f"{server.url}/jobs")

    assert_memory_bounded(server, run)
    status, job, err = result["r"]  # type: ignore[misc]
    assert status == 201, (job, err)
    assert job["inputs"][0]["sha256"] == sha256_file(big)
    assert sha256_file(job_input(server, job)) == sha256_file(big)


def test_chunked_upload(server: ServerProcess, small: Path) -> None:
    """A body without a length (curl -T - sends it chunked) is stored whole."""
    with open(small, "rb") as f:
        r = subprocess.run(
            ["curl", "-sS", "-T", "-", f"{server.url}/jobs?profile=avi-mpeg4"],
            stdin=f,
            capture_output=True,
            timeout=60,
        )
    job = json.loads(r.stdout)
    assert job["state"] in ("queued", "running", "failed")
    assert job["inputs"][0]["size"] == small.stat().st_size
    assert sha256_file(job_input(server, job)) == sha256_file(small)


def test_data_binary_post_is_the_raw_video(server: ServerProcess, small: Path) -> None:
    """curl --data-binary labels the body a urlencoded form; it is still stored as the raw video."""
    status, job, _ = curl(
        "--data-binary", f"@{small}", f"{server.url}/jobs?profile=avi-mpeg4&vbitrate=1500"
    )
    assert status == 201
    assert job["params"]["vbitrate"] == 1500
    assert sha256_file(job_input(server, job)) == sha256_file(small)


def test_two_part_multipart_for_mux(server: ServerProcess, small: Path, tmp_path: Path) -> None:
    """mux-avi takes a video and an audio part, each stored under its role with its own sha256."""
    audio = make_file(tmp_path / "sound.mp3", 200_000)
    status, job, _ = curl(
        "-F", "profile=mux-avi", "-F", f"video=@{small}", "-F", f"audio=@{audio}",
        f"{server.url}/jobs",
    )  # fmt: skip
    assert status == 201
    by_name = {i["name"]: i for i in job["inputs"]}
    assert by_name["video"]["sha256"] == sha256_file(small)
    assert by_name["audio"]["sha256"] == sha256_file(audio)
    assert by_name["audio"]["filename"] == "sound.mp3"
    assert sha256_file(job_input(server, job, 1)) == sha256_file(audio)


def test_two_big_parts_through_the_pump(server: ServerProcess, tmp_path: Path) -> None:
    """Two file parts of several MiB each, big enough that a socket pump reads the body: the first part ends in the middle of a pump buffer and the second starts there, and each is stored whole with its sha256."""
    video = make_file(tmp_path / "v.flv", 9 * MiB + 4321)
    audio = make_file(tmp_path / "a.mp3", 7 * MiB + 77)
    status, job, err = curl(
        "-F", "profile=mux-avi", "-F", f"video=@{video}", "-F", f"audio=@{audio}",
        f"{server.url}/jobs",
    )  # fmt: skip
    assert status == 201, (job, err)
    by_name = {i["name"]: i for i in job["inputs"]}
    for index, (role, path) in enumerate([("video", video), ("audio", audio)]):
        assert by_name[role]["size"] == path.stat().st_size
        assert by_name[role]["sha256"] == sha256_file(path)
        assert sha256_file(job_input(server, job, index)) == sha256_file(path)


@pytest.mark.parametrize(
    "hostile",
    [
        "../../../etc/passwd",
        "a/../../b.flv",
        "..",
        "x\\..\\y.flv",
        "é" * 1000 + ".flv",
        "n" * 10000 + ".flv",
    ],
)
def test_filenames_are_sanitised_never_paths(
    server: ServerProcess, small: Path, hostile: str
) -> None:
    """A hostile ?filename= only names the input for display; the file stays in the job's directory."""
    from urllib.parse import quote

    status, job, _ = curl(
        "-T", str(small), f"{server.url}/jobs?profile=avi-mpeg4&filename={quote(hostile)}"
    )
    assert status == 201
    name = job["inputs"][0]["filename"]
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert 0 < len(name) <= 120
    path = job_input(server, job)
    assert path.parent == server.data_dir / "jobs" / job["id"]


def test_a_name_in_another_script_keeps_its_letters_and_extension(
    server: ServerProcess, small: Path
) -> None:
    """?filename=видео.mp4 names the input видео.mp4, stored with its .mp4 extension."""
    from urllib.parse import quote

    status, job, _ = curl(
        "-T", str(small), f"{server.url}/jobs?profile=avi-mpeg4&filename={quote('видео.mp4')}"
    )
    assert status == 201
    assert job["inputs"][0]["filename"] == "видео.mp4"  # type: ignore[index]
    assert job_input(server, job).name == "input-file.mp4"


def raw_request(
    server: ServerProcess, head: str, body: bytes = b"", wait: float = 5.0
) -> tuple[bytes, socket.socket]:
    """Send a request head (and maybe some body); return what came back before the server closed or `wait` passed."""
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    s.settimeout(wait)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data, s


def parse_response(data: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


@pytest.mark.parametrize(
    ("method", "target", "status", "code"),
    [
        ("PUT", "/nowhere", 404, "not_found"),
        ("PUT", "/jobs/0123456789abcdef0123456789abcdef", 404, "not_found"),
        ("PUT", "/profiles", 405, "method_not_allowed"),
        ("POST", "/metrics", 405, "method_not_allowed"),
        ("PUT", "/jobs?profile=no-such-profile", 422, "unknown_profile"),
        ("PUT", "/jobs", 422, "missing_profile"),
        ("PUT", "/jobs?profile=avi-mpeg4&vbitrate=-o%20/etc/passwd", 422, "invalid_parameter"),
        ("PUT", "/jobs?profile=avi-mpeg4&vbitrate=999999", 422, "invalid_parameter"),
        ("PUT", "/jobs?profile=avi-mpeg4&shell=%3Brm%20-rf", 422, "unknown_parameter"),
        ("PUT", "/jobs?profile=mux-avi", 422, "needs_multipart"),
        ("PUT", "/jobs?profile=avi-mpeg4&callback_url=ftp://h/x", 422, "invalid_callback_url"),
        (
            "PUT",
            "/jobs?profile=avi-mpeg4&callback_url=http://h:99999/",
            422,
            "invalid_callback_url",
        ),
        (
            "PUT",
            "/jobs?profile=avi-mpeg4&callback_url=http%3A%2F%2Fuser%3Apw%40127.0.0.1%3A9%2Fcb",
            422,
            "invalid_callback_url",
        ),
    ],
)
def test_refused_before_the_body_without_100_continue(
    server: ServerProcess, method: str, target: str, status: int, code: str
) -> None:
    """A request the server will refuse gets its JSON error at once: no 100 Continue, nothing stored."""
    before = stored_files(server.data_dir)
    data, s = raw_request(
        server,
        f"{method} {target} HTTP/1.1\nHost: x\nContent-Length: 104857600\nExpect: 100-continue",
    )
    s.close()
    assert b"100 Continue" not in data
    got, headers, body = parse_response(data)
    assert got == status
    assert body["error"]["code"] == code
    assert headers["content-type"] == "application/json"
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
    assert leftovers(server.data_dir) == []
    assert stored_files(server.data_dir) == before


def test_upload_without_any_length_gets_411(server: ServerProcess) -> None:
    """A PUT with neither Content-Length nor chunked Transfer-Encoding (HTTP reads that as no body): 411 length_required, nothing stored."""
    before = stored_files(server.data_dir)
    data, s = raw_request(server, "PUT /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x")
    s.close()
    status, headers, body = parse_response(data)
    assert (status, body["error"]["code"]) == (411, "length_required")
    assert headers["content-type"] == "application/json"
    assert leftovers(server.data_dir) == []
    assert stored_files(server.data_dir) == before


def test_multipart_other_than_form_data_gets_415_without_100_continue(
    server: ServerProcess,
) -> None:
    """A multipart/mixed body is refused with 415 unsupported_media_type before its body: no 100 Continue, nothing stored (other labels are the video itself)."""
    before = stored_files(server.data_dir)
    data, s = raw_request(
        server,
        "POST /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\nContent-Length: 104857600\n"
        "Content-Type: multipart/mixed; boundary=XyZ\nExpect: 100-continue",
    )
    s.close()
    assert b"100 Continue" not in data
    status, _, body = parse_response(data)
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    assert leftovers(server.data_dir) == []
    assert stored_files(server.data_dir) == before


def test_declared_length_above_maximum_gets_413_without_100_continue(server: ServerProcess) -> None:
    """Content-Length above --max-upload-size: 413 before any body byte, no 100 Continue."""
    data, s = raw_request(
        server,
        "PUT /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\nContent-Length: 400000000\nExpect: 100-continue",
    )
    s.close()
    assert b"100 Continue" not in data
    status, _, body = parse_response(data)
    assert status == 413
    assert body["error"]["code"] == "too_large"


def test_content_length_of_5000_zeros_is_zero(server: ServerProcess) -> None:
    """A Content-Length of 5000 zeros is 0 (Python's int() would refuse it): a plain answer."""
    data, s = raw_request(
        server, f"GET /health HTTP/1.1\nHost: x\nConnection: close\nContent-Length: {'0' * 5000}"
    )
    s.close()
    assert parse_response(data)[0] == 200


@pytest.mark.parametrize("method", ["PUT /jobs?profile=avi-mpeg4", "GET /health"])
def test_content_length_of_5000_digits_gets_413(server: ServerProcess, method: str) -> None:
    """
    A Content-Length longer than Python's int() converts (4300 digits) is
    answered 413 too_large like any length past the maximum, not dropped
    with an unhandled error.
    """
    data, s = raw_request(
        server,
        f"{method} HTTP/1.1\nHost: x\nContent-Length: {'0' * 5000}{'9' * 5000}\n"
        "Expect: 100-continue",
    )
    s.close()
    assert b"100 Continue" not in data
    status, _, body = parse_response(data)
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert leftovers(server.data_dir) == []


def test_chunked_body_past_maximum_is_stopped_with_413(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A chunked body that grows past the maximum gets 413 as soon as it does; its partial file is removed."""
    before = stored_files(server.data_dir)
    proc = subprocess.Popen(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-T", "-",
         f"{server.url}/jobs?profile=avi-mpeg4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    sent = 0
    block = os.urandom(MiB)
    try:
        while sent < 400 * MiB and proc.poll() is None:
            proc.stdin.write(block)
            sent += MiB
    except BrokenPipeError:
        pass
    out, _ = proc.communicate(timeout=30)
    assert sent < 400 * MiB, "the server kept reading past the maximum"
    body, _, code = out.decode().rpartition("\n")
    assert code == "413"
    assert json.loads(body)["error"]["code"] == "too_large"
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


@pytest.mark.parametrize("multipart", [False, True])
def test_disconnect_mid_body_leaves_nothing(server: ServerProcess, multipart: bool) -> None:
    """A client that goes away mid-body leaves no partial file, no job and no open file descriptor."""
    jobs_before = stored_files(server.data_dir)
    fds_before = server.open_fds()
    if multipart:
        head = (
            "POST /jobs HTTP/1.1\nHost: x\nContent-Length: 50000000\n"
            "Content-Type: multipart/form-data; boundary=XyZ"
        )
        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.flv"\r\n\r\n'
            + os.urandom(2 * MiB)
        )
    else:
        head = "PUT /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\nContent-Length: 50000000"
        body = os.urandom(2 * MiB)
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    # The partial input exists while the body streams in...
    assert wait_for(lambda: any(p.is_file() for p in leftovers(server.data_dir)))
    s.close()
    # ...and is gone once the client is.
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == jobs_before
    assert wait_for(lambda: server.open_fds() <= fds_before)


# Declared lengths below and above PUMP_MIN: read by the reactor, and by a SocketPump.
DECLARED = pytest.mark.parametrize("declared", [1_000_000, 50_000_000])


@DECLARED
def test_body_shorter_than_content_length_leaves_nothing(
    server: ServerProcess, declared: int
) -> None:
    """A body that ends before its Content-Length (the client half-closes) makes no job and leaves no file."""
    before = stored_files(server.data_dir)
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared
    )
    s.sendall(os.urandom(300_000))
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10)
    assert s.recv(1000) == b""  # closed, no answer: there was no complete request
    s.close()
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(1_000_000, 10_000), (50_000_000, 10_000), (3_000_000, 200_000), (50_000_000, MiB)],
)
def test_idle_client_is_cut_off_and_its_partial_file_removed(
    server: ServerProcess, declared: int, sent: int
) -> None:
    """
    A client that stops sending mid-body is answered 408 too_slow and
    disconnected after --idle-timeout (3 s here), read by the reactor or by a
    pump (50 MB); also one that sent well at first (more than the body-rate
    check asks for in its first window), which the idle timeout, not that
    check, catches.  Nothing stays.
    """
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared
    )
    s.sendall(os.urandom(sent))
    assert wait_for(lambda: leftovers(server.data_dir) != [])
    started = time.monotonic()
    s.settimeout(30)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert 2 < time.monotonic() - started < 20
    status, _, body = parse_response(data)
    assert (status, body["error"]["code"]) == (408, "too_slow")
    s.close()
    assert wait_for(lambda: leftovers(server.data_dir) == [])


def test_sha256_query_and_repr_digest_are_checked(server: ServerProcess, small: Path) -> None:
    """A matching ?sha256= or Repr-Digest is accepted; a mismatch answers 400 and keeps nothing."""
    digest = sha256_file(small)
    status, _, _ = curl("-T", str(small), f"{server.url}/jobs?profile=avi-mpeg4&sha256={digest}")
    assert status == 201
    b64 = base64.b64encode(bytes.fromhex(digest)).decode()
    status, _, _ = curl(
        "-T",
        str(small),
        "-H",
        f"Repr-Digest: sha-256=:{b64}:",
        f"{server.url}/jobs?profile=avi-mpeg4",
    )
    assert status == 201
    before = stored_files(server.data_dir)
    status, body, _ = curl(
        "-T", str(small), f"{server.url}/jobs?profile=avi-mpeg4&sha256={'0' * 64}"
    )
    assert (status, body["error"]["code"]) == (400, "digest_mismatch")
    wrong = base64.b64encode(bytes(32)).decode()
    status, body, _ = curl(
        "-T",
        str(small),
        "-H",
        f"Repr-Digest: sha-256=:{wrong}:",
        f"{server.url}/jobs?profile=avi-mpeg4",
    )
    assert (status, body["error"]["code"]) == (400, "digest_mismatch")
    assert leftovers(server.data_dir) == []
    assert stored_files(server.data_dir) == before


def test_content_md5_is_checked(server: ServerProcess, small: Path) -> None:
    """Content-MD5 that matches is accepted; one that does not answers 400."""
    md5 = base64.b64encode(hashlib.md5(small.read_bytes()).digest()).decode()
    status, _, _ = curl(
        "-T", str(small), "-H", f"Content-MD5: {md5}", f"{server.url}/jobs?profile=avi-mpeg4"
    )
    assert status == 201
    bad = base64.b64encode(bytes(16)).decode()
    status, body, _ = curl(
        "-T", str(small), "-H", f"Content-MD5: {bad}", f"{server.url}/jobs?profile=avi-mpeg4"
    )
    assert (status, body["error"]["code"]) == (400, "digest_mismatch")


def form_body(tmp_path: Path, name: str, fields: dict[str, str], file: Path) -> Path:
    """A multipart/form-data body (boundary XyZ) with C{fields}, then C{file} as the "file" part."""
    out = tmp_path / name
    with open(out, "wb") as f:
        for key, value in fields.items():
            f.write(
                f'--XyZ\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
            )
        f.write(b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.flv"\r\n\r\n')
        f.write(file.read_bytes())
        f.write(b"\r\n--XyZ--\r\n")
    return out


def send_form(server: ServerProcess, body: Path, *headers: str) -> tuple[int, dict[str, object]]:
    args = ["-H", "Content-Type: multipart/form-data; boundary=XyZ", "-H", "Expect:"]
    for header in headers:
        args += ["-H", header]
    status, answer, _ = curl(*args, "--data-binary", f"@{body}", f"{server.url}/jobs")
    return status, answer


@pytest.mark.parametrize("size", [3 * MiB + 12345, 9 * MiB + 7])
def test_whole_body_digests_of_a_multipart_upload_are_checked(
    server: ServerProcess, tmp_path: Path, size: int
) -> None:
    """
    Content-MD5 and Repr-Digest on a multipart upload are the whole body's
    (every part and delimiter), through the reactor and (above 4 MiB) the
    pump alike: matching ones are accepted, a mismatch answers 400 and
    keeps nothing.
    """
    clip = make_file(tmp_path / "clip.flv", size)
    body = form_body(tmp_path, "form.bin", {"profile": "avi-mpeg4"}, clip)
    data = body.read_bytes()
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    status, job = send_form(server, body, f"Content-MD5: {md5}", f"Repr-Digest: sha-256=:{sha}:")
    assert status == 201
    assert job["inputs"][0]["sha256"] == sha256_file(clip)  # type: ignore[index]
    before = stored_files(server.data_dir)
    wrong_md5 = base64.b64encode(bytes(16)).decode()
    wrong_sha = base64.b64encode(bytes(32)).decode()
    for header in (f"Content-MD5: {wrong_md5}", f"Repr-Digest: sha-256=:{wrong_sha}:"):
        status, answer = send_form(server, body, header)
        assert (status, answer["error"]["code"]) == (400, "digest_mismatch")  # type: ignore[index]
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


def test_input_digests_name_the_profiles_inputs(server: ServerProcess, small: Path) -> None:
    """
    ?sha256.<input> checks that input of a raw upload; a digest for an input
    the profile does not have is refused (400 bad_digest) before the body,
    raw or multipart, rather than silently not checked.
    """
    url = f"{server.url}/jobs?profile=avi-mpeg4"
    status, _, _ = curl("-T", str(small), f"{url}&sha256.file={sha256_file(small)}")
    assert status == 201
    before = stored_files(server.data_dir)
    status, body, _ = curl("-T", str(small), f"{url}&sha256.file={'0' * 64}")
    assert (status, body["error"]["code"]) == (400, "digest_mismatch")
    status, body, _ = curl("-T", str(small), f"{url}&sha256.video={'0' * 64}")
    assert (status, body["error"]["code"]) == (400, "bad_digest")
    status, body, _ = curl(
        "-F", "profile=avi-mpeg4", "-F", f"sha256.zzz={'0' * 64}", "-F", f"file=@{small}",
        f"{server.url}/jobs",
    )  # fmt: skip
    assert (status, body["error"]["code"]) == (400, "bad_digest")
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


@pytest.mark.parametrize(
    ("args", "url"),
    [
        ([], "/jobs?profile=avi-mpeg4&vbitrate=500&vbitrate=900"),
        (["-F", "profile=avi-mpeg4"], "/jobs?profile=mp4-h264"),
        (["-F", "profile=avi-mpeg4", "-F", "profile=mp4-h264"], "/jobs"),
        (["-F", "profile=avi-mpeg4", "-F", "vbitrate=500", "-F", "vbitrate=900"], "/jobs"),
    ],
)
def test_a_field_given_two_values_is_refused(
    server: ServerProcess, small: Path, args: list[str], url: str
) -> None:
    """
    A field given twice with different values, in the query, in the form, or
    one in each, is refused with 400 conflicting_fields rather than one of
    them winning silently; nothing is kept.
    """
    before = stored_files(server.data_dir)
    send = [*args, "-F", f"file=@{small}"] if args else ["-T", str(small)]
    status, body, _ = curl(*send, f"{server.url}{url}")
    assert (status, body["error"]["code"]) == (400, "conflicting_fields")
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


def test_a_field_repeated_with_one_value_is_accepted(server: ServerProcess, small: Path) -> None:
    """The same value given twice (query and form) is no conflict: the upload is taken."""
    status, job, _ = curl(
        "-F", "profile=avi-mpeg4", "-F", "vbitrate=700", "-F", f"file=@{small}",
        f"{server.url}/jobs?profile=avi-mpeg4&vbitrate=700",
    )  # fmt: skip
    assert status == 201
    assert job["profile"] == "avi-mpeg4"
    assert job["params"]["vbitrate"] == 700  # type: ignore[index]


def test_a_422_after_the_body_has_its_reason_phrase(server: ServerProcess, tmp_path: Path) -> None:
    """
    A 422 found once the body is in (a form's bad parameter) says
    "422 Unprocessable Entity" in its status line, not Twisted's "Unknown
    Status" for a code it has no phrase for.
    """
    clip = make_file(tmp_path / "c.flv", 1000)
    body = form_body(tmp_path, "form.bin", {"profile": "avi-mpeg4", "vbitrate": "99999"}, clip)
    data, s = raw_request(
        server,
        "POST /jobs HTTP/1.1\nHost: x\nConnection: close\n"
        f"Content-Type: multipart/form-data; boundary=XyZ\nContent-Length: {body.stat().st_size}",
        body.read_bytes(),
    )
    s.close()
    assert data.startswith(b"HTTP/1.1 422 Unprocessable Entity\r\n"), data[:200]
    assert parse_response(data)[2]["error"]["code"] == "invalid_parameter"  # type: ignore[index]
    assert wait_for(lambda: leftovers(server.data_dir) == [])


@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        ("multipart/form-dataX; boundary=XyZ", 415),
        ("multipart/form-data; xboundary=XyZ", 400),
        ('multipart/form-data; boundary=""', 400),
        ("multipart/form-data; boundary=\xe9t\xe9", 400),
        ("multipart/form-data; boundary=" + "b" * 71, 400),
        ('multipart/form-data; boundary="ends-in-space "', 400),
    ],
)
def test_multipart_labels_and_boundaries_are_checked_before_the_body(
    server: ServerProcess, ctype: str, status: int
) -> None:
    """
    Only multipart/form-data is parsed (415 for another multipart type),
    and its boundary must be one RFC 2046 allows: otherwise 400 before the
    body, not after the client has sent it all.
    """
    data, s = raw_request(
        server,
        "POST /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\nContent-Length: 104857600\n"
        f"Content-Type: {ctype}\nExpect: 100-continue",
    )
    s.close()
    assert b"100 Continue" not in data
    got, _, body = parse_response(data)
    assert (got, body["error"]["code"]) == (
        status,
        "unsupported_media_type" if status == 415 else "bad_multipart",
    )
    assert leftovers(server.data_dir) == []


@pytest.mark.parametrize(
    ("param", "boundary"),
    [
        ("xboundary=AAA; boundary=XyZ", "XyZ"),
        ("boundary=ab:cd", "ab:cd"),
        ("boundary====123==", "===123=="),
        ('boundary="a b"', "a b"),
    ],
)
def test_boundary_is_the_boundary_parameter(
    server: ServerProcess, tmp_path: Path, param: str, boundary: str
) -> None:
    """
    The boundary comes from the parameter named boundary (not one whose
    name ends in it), whole, quoted or not, even with characters that
    strictly need quotes.
    """
    clip = make_file(tmp_path / "c.flv", 5000)
    body = form_body(tmp_path, "form.bin", {"profile": "avi-mpeg4"}, clip)
    body.write_bytes(body.read_bytes().replace(b"--XyZ", b"--" + boundary.encode()))
    status, job, _ = curl(
        "-H", f"Content-Type: multipart/form-data; {param}", "-H", "Expect:",
        "--data-binary", f"@{body}", f"{server.url}/jobs",
    )  # fmt: skip
    assert status == 201, job
    assert job["inputs"][0]["sha256"] == sha256_file(clip)  # type: ignore[index]


def test_a_part_header_not_utf8_is_named_without_python_objects(server: ServerProcess) -> None:
    """A part whose headers are not UTF-8 gets 400 bad_multipart in plain words, not a repr."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="\xff\xfe.flv"\r\n\r\n'
        b"abc\r\n--XyZ--\r\n"
    )
    data, s = raw_request(
        server,
        "POST /jobs HTTP/1.1\nHost: x\nConnection: close\n"
        f"Content-Type: multipart/form-data; boundary=XyZ\nContent-Length: {len(body)}",
        body,
    )
    s.close()
    status, _, answer = parse_response(data)
    error = answer["error"]
    assert (status, error["code"]) == (400, "bad_multipart")  # type: ignore[index]
    message = error["message"]  # type: ignore[index]
    assert "Error(" not in message and "b'" not in message and "\\x" not in message, message
    assert wait_for(lambda: leftovers(server.data_dir) == [])


def test_empty_file_part_gets_400(server: ServerProcess, tmp_path: Path) -> None:
    """A file part with no bytes is an empty input, as an empty raw body is: 400 empty_body."""
    empty = tmp_path / "empty.flv"
    empty.write_bytes(b"")
    before = stored_files(server.data_dir)
    status, body, _ = curl("-F", "profile=avi-mpeg4", "-F", f"file=@{empty}", f"{server.url}/jobs")
    assert (status, body["error"]["code"]) == (400, "empty_body")
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (["-F", "profile=mux-avi", "-F", "video=@{f}"], "missing_input"),
        (["-F", "profile=avi-mpeg4", "-F", "video=@{f}"], "unknown_input"),
        (["-F", "profile=avi-mpeg4", "-F", "file=@{f}", "-F", "file=@{f}"], "duplicate_input"),
        (
            ["-F", "profile=avi-mpeg4", "-F", "file=@{f}", "-F", "vbitrate=12abc"],
            "invalid_parameter",
        ),
        (["-F", "file=@{f}"], "missing_profile"),
    ],
)
def test_bad_multipart_uploads_get_422_and_leave_nothing(
    server: ServerProcess, small: Path, fields: list[str], code: str
) -> None:
    """Multipart uploads naming wrong inputs or parameters are refused with the reason; nothing is kept."""
    before = stored_files(server.data_dir)
    status, body, _ = curl(*[a.replace("{f}", str(small)) for a in fields], f"{server.url}/jobs")
    assert status == 422
    assert body["error"]["code"] == code
    assert wait_for(lambda: leftovers(server.data_dir) == [])
    assert stored_files(server.data_dir) == before


def test_truncated_multipart_gets_400(server: ServerProcess) -> None:
    """A multipart body that ends inside a part is malformed: 400, nothing kept."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.flv"\r\n\r\n'
        + b"x"
        * 5000
    )
    data, s = raw_request(
        server,
        "POST /jobs HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=XyZ\n"
        f"Content-Length: {len(body)}",
        body,
    )
    s.close()
    status, _, err = parse_response(data)
    assert (status, err["error"]["code"]) == (400, "bad_multipart")
    assert wait_for(lambda: leftovers(server.data_dir) == [])


@DECLARED
def test_trickling_body_is_cut_off_with_408(server: ServerProcess, declared: int) -> None:
    """A body that never pauses for the idle timeout but brings under 64 KiB per idle window (3 s here) gets 408 and its partial file is removed."""
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared
    )
    started = time.monotonic()
    s.settimeout(0.5)
    data = b""
    try:
        while time.monotonic() - started < 15:
            try:
                s.sendall(b"x" * 100)
            except OSError:
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    elapsed = time.monotonic() - started
    status, _, body = parse_response(data)
    assert (status, body["error"]["code"]) == (408, "too_slow")
    assert 2.5 < elapsed < 12
    assert wait_for(lambda: leftovers(server.data_dir) == [])


def test_body_just_above_the_pump_threshold_keeps_the_idle_timeout(server: ServerProcess) -> None:
    """A body too short, once its first bytes are in, to be worth a pump is read by the reactor: it is stored right, and the kept-alive connection is still closed after --idle-timeout (3 s here)."""
    from transcoder.http.request import PUMP_MIN, PUMP_TAIL

    body = os.urandom(PUMP_MIN + PUMP_TAIL + 1000)
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    s.settimeout(30)
    data = b""
    while b"}" not in data:
        chunk = s.recv(65536)
        assert chunk, "closed before the answer"
        data += chunk
    status, _, job = parse_response(data)
    assert status == 201
    assert job["inputs"][0]["sha256"] == hashlib.sha256(body).hexdigest()
    answered = time.monotonic()
    assert s.recv(1) == b""  # the server closes the idle connection
    assert time.monotonic() - answered < 15
    s.close()

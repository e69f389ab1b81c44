"""
The C{transcoder} command's client subcommands: option parsing, and the real
command run as a subprocess against a real server with real encoders.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverproc import LISTEN, ServerProcess, random_file, serve, start, transcoder
from twisted.python import usage

from transcoder.client.cli import (
    DEFAULT_SERVER,
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    DownloadOptions,
    Options,
    SubmitOptions,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("cli-server")
    proc = serve(d / "data", d / "serve.log")
    yield proc
    proc.stop()


def _run(server: ServerProcess | None, *args: str, cwd: Path | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    if server is not None:
        env["TRANSCODER_URL"] = server.url
    return subprocess.run(
        [transcoder(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


# Parsing.


def test_submit_options_in_any_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options may follow FILE; --audio makes video+audio inputs; -o implies --wait; params collect."""
    monkeypatch.delenv("TRANSCODER_URL", raising=False)
    monkeypatch.setenv("TRANSCODER_TOKEN", "s3cret")
    video, audio = tmp_path / "v.flv", tmp_path / "a.mp3"
    video.write_bytes(b"v")
    audio.write_bytes(b"a")
    options = Options()
    options.parseOptions(
        [
            *("submit", str(video), "--audio", str(audio)),
            *("-p", "mux-avi", "-o", "out.avi", "--param", "x=1", "--param=y=a=b"),
        ]
    )
    sub = options.subOptions
    assert sub["upload"] == {"video": video, "audio": audio}
    assert sub["profile"] == "mux-avi"
    assert sub["wait"]
    assert sub["params"] == {"x": "1", "y": "a=b"}
    assert sub["server"] == DEFAULT_SERVER
    assert sub["token"] == "s3cret"

    single = SubmitOptions()
    single.parseOptions(["--profile", "avi-mpeg4", str(video), "--server", "http://h:1"])
    assert single["upload"] == video
    assert not single["wait"]
    assert single["server"] == "http://h:1"


@pytest.mark.parametrize(
    "argv",
    [
        ["--profile", "p"],
        ["FILE"],
        ["FILE", "--profile", "p", "--param", "novalue"],
        ["--audio", "FILE", "--profile", "p"],
        ["FILE", "--profile", "p", "--input", "video=FILE"],
        ["/no/such/file", "--profile", "p"],
    ],
)
def test_submit_usage_errors(argv: list[str], tmp_path: Path) -> None:
    """Missing profile or file, a malformed --param, or conflicting inputs are usage errors."""
    file = tmp_path / "f.flv"
    file.write_bytes(b"x")
    with pytest.raises(usage.UsageError):
        SubmitOptions().parseOptions([str(file) if a == "FILE" else a for a in argv])


def test_download_takes_an_output_or_none() -> None:
    """download takes -o OUT, or none (the server's suggested name is used then)."""
    options = DownloadOptions()
    options.parseOptions(["abc"])
    assert options["output"] is None
    options = DownloadOptions()
    options.parseOptions(["abc", "-o", "x.mp4"])
    assert options["output"] == "x.mp4"


# The real command.


def test_mux_avi_in_one_line(
    server: ServerProcess, clips: Any, tmp_path: Path, ffprobe_json: Callable[[Path], Any]
) -> None:
    """
    `transcoder submit v.flv --audio a.mp3 --profile mux-avi --wait -o out.avi`
    uploads both files, waits, and saves an AVI with the FLV video and the MP3
    audio; stdout is the job id, stderr has plain progress lines (no terminal).
    """
    out = tmp_path / "out.avi"
    result = _run(
        server,
        "submit",
        str(clips.flv_video),
        "--audio",
        str(clips.mp3_audio),
        "--profile",
        "mux-avi",
        "--wait",
        "-o",
        str(out),
    )
    assert result.returncode == EXIT_OK, result.stderr
    job_id = result.stdout.strip()
    assert len(job_id) == 32
    assert "upload: 100%" in result.stderr
    assert f"job {job_id}: succeeded" in result.stderr
    assert "download: 100%" in result.stderr
    assert "\r" not in result.stderr
    probe = ffprobe_json(out)
    assert probe["format"]["format_name"] == "avi"
    codecs = sorted(s["codec_name"] for s in probe["streams"])
    assert codecs == ["flv1", "mp3"]
    assert abs(float(probe["format"]["duration"]) - 3.0) < 0.3

    status = _run(server, "status", job_id)
    assert status.returncode == EXIT_OK
    assert json.loads(status.stdout)["state"] == "succeeded"
    listed = _run(server, "jobs", "--state", "succeeded")
    assert any(line.split()[:2] == [job_id, "succeeded"] for line in listed.stdout.splitlines())

    again = tmp_path / "again.avi"
    downloaded = _run(server, "download", job_id, "-o", str(again), "-q")
    assert downloaded.returncode == EXIT_OK, downloaded.stderr
    assert again.read_bytes() == out.read_bytes()
    assert downloaded.stderr == ""


def test_failed_job_exits_1(server: ServerProcess, clips: Any) -> None:
    """A job that fails (garbage input) makes submit --wait and wait exit 1, with the reason."""
    result = _run(server, "submit", str(clips.noise), "--profile", "avi-mpeg4", "--wait")
    assert result.returncode == EXIT_JOB_FAILED, result.stderr
    job_id = result.stdout.strip()
    assert f"job {job_id} failed" in result.stderr
    waited = _run(server, "wait", job_id)
    assert waited.returncode == EXIT_JOB_FAILED
    assert json.loads(waited.stdout)["state"] == "failed"


def test_cancel_then_status_is_a_server_error(server: ServerProcess, clips: Any) -> None:
    """cancel exits 0; the job is then unknown, and status exits 3 with the server's code."""
    submitted = _run(
        server, "submit", str(clips.av_long), "-p", "mp4-h264", "--param", "preset=veryslow"
    )
    assert submitted.returncode == EXIT_OK, submitted.stderr
    job_id = submitted.stdout.strip()
    assert _run(server, "cancel", job_id).returncode == EXIT_OK
    status = _run(server, "status", job_id)
    assert status.returncode == EXIT_SERVER_ERROR
    assert "404" in status.stderr and "not_found" in status.stderr


def test_exit_codes_for_refusals_and_unreachable_servers(server: ServerProcess, clips: Any) -> None:
    """An unknown profile exits 3; no server exits 4; bad usage exits 2."""
    refused = _run(server, "submit", str(clips.av), "--profile", "nope")
    assert refused.returncode == EXIT_SERVER_ERROR
    assert "unknown_profile" in refused.stderr
    assert refused.stdout == ""
    unreachable = _run(None, "jobs", "--server", "http://127.0.0.1:9")
    assert unreachable.returncode == EXIT_CONNECTION
    assert "127.0.0.1:9" in unreachable.stderr
    assert _run(server, "submit", str(clips.av)).returncode == EXIT_USAGE
    assert _run(server, "frobnicate").returncode == EXIT_USAGE


def test_progress_bars_on_a_terminal(server: ServerProcess, clips: Any, tmp_path: Path) -> None:
    """
    With stderr on a terminal, upload and transcode progress are drawn as
    bars in binary units, and the transcode bar ends saying "succeeded" at 100%.
    """
    master, slave = pty.openpty()
    # A new pty is 0x0; tqdm sizes its bar to the terminal.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    proc = subprocess.Popen(
        [
            *(transcoder(), "submit", str(clips.av), "-p", "avi-mpeg4", "--wait"),
            *("-o", str(tmp_path / "o.avi"), "--server", server.url),
        ],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    os.close(slave)
    screen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(60) == EXIT_OK
    text = screen.decode("utf-8", "replace")
    assert "upload" in text and "running" in text and "download" in text
    assert "\r" in text and "|" in text
    assert "succeeded: 100%|" in text
    assert "KiB" in text and "KB" not in text and "kB" not in text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_waiting_exits_130(server: ServerProcess, clips: Any, sig: int) -> None:
    """
    SIGINT or SIGTERM during --wait exits 130 saying so, and that the job goes
    on running on the server, with its id and the command that stops it
    (which works as printed); the job does go on.
    """
    proc = _start(
        *("submit", str(clips.av_long), "-p", "mp4-h264"),
        *("--param", "preset=veryslow", "--wait", "-q", "--server", server.url),
    )
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    _, stderr = _interrupt(proc, sig)
    assert f"job {job_id} goes on running on the server" in stderr
    hint = f"transcoder -s {server.url} cancel {job_id}"
    assert stderr.rstrip().endswith(hint)
    status = _run(server, "status", job_id)
    assert json.loads(status.stdout)["state"] in ("queued", "running", "succeeded")
    assert _run(None, *hint.split()[1:]).returncode == EXIT_OK
    assert _run(server, "status", job_id).returncode == EXIT_SERVER_ERROR


class _ThreadServer:
    """A loopback TCP server in a thread: each connection to C{_handle} on a thread of its own."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self._listener.accept()
                self._conns.append(conn)
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        except OSError:
            return

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


class _RawServer(_ThreadServer):
    """
    A loopback TCP server in a thread that answers nothing: it reads what
    comes and, after C{cut} bytes of a connection, resets it (C{cut=None}:
    keeps reading, never answers).  With C{read=False} it accepts
    connections and reads nothing, as a stopped server's kernel does.
    """

    def __init__(self, cut: int | None, read: bool = True) -> None:
        self.cut = cut
        self.read = read
        self.received = 0
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        if not self.read:
            return
        try:
            while chunk := conn.recv(65536):
                self.received += len(chunk)
                if self.cut is not None and self.received >= self.cut:
                    # SO_LINGER 0: close with a reset, as a killed server's kernel does.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
        except OSError:
            return


def test_connection_lost_during_upload_exits_4(tmp_path: Path) -> None:
    """
    A server that drops the connection while the body is being sent: submit
    says it cannot talk to the server and exits 4 (no traceback, not 1).
    """
    file = random_file(tmp_path / "big.nut", 32 << 20)
    raw = _RawServer(cut=1 << 20)
    try:
        result = _run(None, "submit", str(file), "-p", "mp4-h264", "-q", "-s", raw.url)
    finally:
        raw.close()
    assert raw.received >= 1 << 20
    assert result.returncode == EXIT_CONNECTION, result.stderr
    assert f"transcoder: cannot talk to {raw.url}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


class _StallingDownloads(_ThreadServer):
    """
    A loopback HTTP server in a thread for C{download}: it describes a
    succeeded job, and answers its result with the headers and the first
    C{sent} of C{size} bytes, then goes silent.
    """

    JOB_ID = "b" * 32

    def __init__(self, size: int, sent: int) -> None:
        self.size = size
        self.sent = sent
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        buffered = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                head, buffered = buffered.split(b"\r\n\r\n", 1)
                path = head.split(b" ")[1].split(b"?")[0]
                if path.endswith(b"/result"):
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size
                        + os.urandom(self.sent)
                    )
                    return  # and never a byte more
                job = {"id": self.JOB_ID, "profile": "p", "state": "succeeded", "progress": 100}
                body = json.dumps(job).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
        except OSError:
            return


def _start(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    return subprocess.Popen(
        [transcoder(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )


def _interrupt(proc: subprocess.Popen[str], sig: int) -> tuple[str, str]:
    """
    Send C{sig} to C{proc}; its stdout and stderr, once it has exited 130
    saying it was interrupted, without a traceback.
    """
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "transcoder: interrupted" in stderr
    assert "Traceback" not in stderr
    return stdout, stderr


def _await_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
    """What C{proc} wrote on stderr up to a line that starts with C{prefix}."""
    assert proc.stderr is not None
    # Straight from the pipe: a buffered readline could hold the line wanted
    # while select waits for more.
    fd = proc.stderr.fileno()
    text = ""
    while not any(
        line.startswith(prefix) and line.endswith("\n") for line in text.splitlines(keepends=True)
    ):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no {prefix!r} line in {timeout} s: {text!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"stderr ended without a {prefix!r} line: {text!r}"
        text += chunk.decode()
    return text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_upload_exits_130(tmp_path: Path, sig: int) -> None:
    """
    SIGINT or SIGTERM while a body is being sent (to a server that stopped
    reading) exits 130 saying interrupted, with no job id on stdout.
    """
    file = random_file(tmp_path / "big.nut", 32 << 20)
    raw = _RawServer(cut=None, read=False)
    try:
        proc = _start("submit", str(file), "-p", "mp4-h264", "-s", raw.url)
        _await_line(proc, "upload:")
        stdout, _ = _interrupt(proc, sig)
    finally:
        raw.close()
    assert stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_download_exits_130(tmp_path: Path, sig: int) -> None:
    """
    SIGINT or SIGTERM while a result streams in exits 130 saying
    interrupted; the bytes received stay in OUT.part for a later download
    to resume, and OUT is not created.
    """
    fake = _StallingDownloads(size=8 << 20, sent=1 << 20)
    out = tmp_path / "out.bin"
    try:
        proc = _start("download", fake.JOB_ID, "-o", str(out), "-s", fake.url)
        _await_line(proc, "download: 10%")
        _interrupt(proc, sig)
    finally:
        fake.close()
    assert not out.exists()
    # At least the tenth the progress line counted, at most what was sent.
    assert (8 << 20) // 10 <= (tmp_path / "out.bin.part").stat().st_size <= 1 << 20


def _catches(pid: int, sig: int) -> bool:
    """Whether process C{pid} has a handler for C{sig} (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_signal_as_the_command_starts_exits_130() -> None:
    """
    SIGTERM as soon as the command handles it (from the start of main(),
    while it imports, parses its options and starts the reactor) exits 130
    saying interrupted, not 143 or 0.
    """
    raw = _RawServer(cut=None, read=False)
    try:
        proc = _start("jobs", "-s", raw.url)
        deadline = time.monotonic() + 30
        while not _catches(proc.pid, signal.SIGTERM):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        _interrupt(proc, signal.SIGTERM)
    finally:
        raw.close()


_PACED = """
[paced]
description = "H.264 in MP4, reading the input at its native rate: a job lasts as long as its clip."
executable = "ffmpeg"
argv = [
    "-nostdin", "-y", "-nostats", "-progress", "pipe:1", "-re", "-i", "{file}",
    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", "-f", "mp4",
    "{output}",
]
output_extension = "mp4"
media_type = "video/mp4"
progress = "ffmpeg"
"""


def test_wait_follows_the_job_through_a_server_restart(tmp_path: Path) -> None:
    """
    `transcoder wait` while the server is stopped (SIGTERM) and started again
    on the same port and data dir: it keeps polling through the refused
    connections and exits 0 with the job, run again after the restart,
    succeeded.
    """
    profiles = tmp_path / "paced.toml"
    profiles.write_text(_PACED)
    clip = tmp_path / "clip.mp4"
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi"),
            *("-i", "testsrc=size=160x120:rate=25:duration=1.5"),
            *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(clip)),
        ],
        check=True,
        timeout=60,
    )
    data = tmp_path / "data"
    first = serve(data, tmp_path / "first.log", "--profiles", str(profiles))
    argv = [transcoder(), "serve", "--data-dir", str(data), "--profiles", str(profiles)]
    second = None
    try:
        submitted = _run(first, "submit", str(clip), "-p", "paced", "-q")
        assert submitted.returncode == EXIT_OK, submitted.stderr
        job_id = submitted.stdout.strip()
        proc = _start("wait", job_id, "-s", first.url)
        _await_line(proc, f"job {job_id}: running")
        assert first.stop() == 0
        time.sleep(0.5)  # refused connections meanwhile
        listen = LISTEN.replace("tcp:0:", f"tcp:{first.port}:")
        second = start([*argv, "--listen", listen], data, tmp_path / "second.log")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        first.kill()
        if second is not None:
            second.stop()
    assert proc.returncode == EXIT_OK, stderr
    assert json.loads(stdout)["state"] == "succeeded"
    assert "Traceback" not in stderr


def test_download_to_a_directory_writes_every_output(server: ServerProcess, tmp_path: Path) -> None:
    """`transcoder download ID -o DIR` of a thumbnails job writes each still and the poster into DIR; `submit ... -o DIR/` does the same; a one-output job's -o FILE still writes that file."""
    clip = tmp_path / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=2",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(clip)],
        check=True, timeout=60,
    )  # fmt: skip
    r = _run(server, "submit", str(clip), "-p", "thumbnails", "--param", "count=2", "--wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split()[0]
    out = tmp_path / "thumbs"
    out.mkdir()
    r = _run(server, "download", job_id, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["poster.jpg", "thumb-001.jpg", "thumb-002.jpg"]
    assert all((out / n).read_bytes()[:2] == b"\xff\xd8" for n in os.listdir(out))
    again = tmp_path / "again"
    r = _run(
        server, "submit", str(clip), "-p", "thumbnails", "--param", "count=1", "-o", f"{again}/"
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(again)) == ["poster.jpg", "thumb-001.jpg"]
    r = _run(
        server,
        "submit",
        str(clip),
        "-p",
        "mp4-h264",
        "--param",
        "preset=ultrafast",
        "-o",
        str(tmp_path / "one.mp4"),
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "one.mp4").stat().st_size > 0

"""
Webhook bodies carry absolute URLs (C{url}, C{output.result_url}, each output's
C{url}): C{--public-url} when given, else what the upload's C{Host} header said.
Checked end to end: C{transcoder serve}, curl uploads, a real receiver on loopback.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Clips
from serverproc import serve, transcoder, wait_for

from transcoder.http.publicurl import public_url_problem


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Any]:
    """An HTTP server on loopback that keeps the JSON bodies POSTed to it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _submit(url: str, clip: Path, hook: str, *headers: str) -> str:
    args = [a for h in headers for a in ("-H", h)]
    up = subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args, "-T", str(clip),
         f"{url}/jobs?profile=audio-mp3&abitrate=64&callback_url={hook}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    job_id: str = json.loads(up.stdout)["id"]
    return job_id


def _delivered(receiver: Any, count: int) -> list[dict[str, Any]]:
    assert wait_for(lambda: len(receiver.bodies) >= count, timeout=60)
    bodies: list[dict[str, Any]] = receiver.bodies
    return bodies


def _urls(body: dict[str, Any]) -> list[str]:
    return [body["url"], body["output"]["result_url"], *(o["url"] for o in body["outputs"])]


def test_webhook_urls_follow_the_uploads_host(tmp_path: Path, clips: Clips, receiver: Any) -> None:
    """Without --public-url, a webhook's URLs start with http:// and the Host the upload was sent to (curl's own, or one set by a proxy), and name the job's result and outputs; the job's own JSON stays relative."""
    hook = f"http://127.0.0.1:{receiver.server_port}/hook"
    server = serve(tmp_path / "data", tmp_path / "server.log")
    try:
        first = _submit(server.url, clips.mp3_audio, hook)
        (body,) = _delivered(receiver, 1)
        second = _submit(server.url, clips.mp3_audio, hook, "Host: Transcode.Example.org")
        _, proxied = _delivered(receiver, 2)
        bad = _submit(server.url, clips.mp3_audio, hook, "Host: a b/c")
        _, _, fallback = _delivered(receiver, 3)
        with subprocess.Popen(
            ["curl", "-sS", f"{server.url}/jobs/{first}"], stdout=subprocess.PIPE
        ) as p:
            own = json.loads(p.communicate(timeout=30)[0])
    finally:
        server.stop()
    assert body["id"] == first and body["state"] == "succeeded"
    assert _urls(body) == [
        f"{server.url}/jobs/{first}",
        f"{server.url}/jobs/{first}/result",
        f"{server.url}/jobs/{first}/outputs/result.mp3",
    ]
    assert proxied["id"] == second
    assert proxied["output"]["result_url"] == f"http://transcode.example.org/jobs/{second}/result"
    # A Host header that is no host and port: the address the upload came in on.
    assert fallback["id"] == bad
    assert fallback["output"]["result_url"] == f"{server.url}/jobs/{bad}/result"
    assert own["output"]["result_url"] == f"/jobs/{first}/result"


def test_public_url_option_wins(tmp_path: Path, clips: Clips, receiver: Any) -> None:
    """With --public-url https://transcode.example.org/base/ (trailing slash dropped), every URL of a webhook body starts with it, whatever the Host header said."""
    hook = f"http://127.0.0.1:{receiver.server_port}/hook"
    server = serve(
        tmp_path / "data", tmp_path / "server.log",
        "--public-url", "https://transcode.example.org/base/",
    )  # fmt: skip
    try:
        job_id = _submit(server.url, clips.mp3_audio, hook, "Host: other.example.org")
        (body,) = _delivered(receiver, 1)
    finally:
        server.stop()
    base = "https://transcode.example.org/base"
    assert _urls(body) == [
        f"{base}/jobs/{job_id}",
        f"{base}/jobs/{job_id}/result",
        f"{base}/jobs/{job_id}/outputs/result.mp3",
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://transcode.example.org", "must start with http:// or https://"),
        ("https://", "must name a host"),
        ("https://user:secret@transcode.example.org", "must have no user name or password"),
        ("https://transcode.example.org/?x=1", "must have no query or fragment"),
        ("https://bad host", "must name a host"),
    ],
)
def test_a_bad_public_url_is_a_usage_error(tmp_path: Path, url: str, problem: str) -> None:
    """`transcoder serve --public-url` refuses what is not an http(s) URL of a host, before starting, saying why."""
    assert public_url_problem(url) is not None
    result = subprocess.run(
        [transcoder(), "serve", "--data-dir", str(tmp_path), "--public-url", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"--public-url {problem}" in result.stderr + result.stdout


def test_webhook_urls_of_a_tus_upload_are_absolute(
    tmp_path: Path, clips: Clips, receiver: Any
) -> None:
    """A job made by a resumable (tus) upload with callback_url in its metadata, sent by tuspy, gets a webhook whose URLs start with the Host the upload was created through, as a plain upload's do."""
    from tusclient.client import TusClient

    hook = f"http://127.0.0.1:{receiver.server_port}/hook"
    server = serve(tmp_path / "data", tmp_path / "server.log")
    try:
        uploader = TusClient(server.url + "/uploads").uploader(
            str(clips.mp3_audio),
            chunk_size=1 << 20,
            metadata={"profile": "audio-mp3", "filename": "a.mp3", "callback_url": hook},
        )
        uploader.upload()
        (body,) = _delivered(receiver, 1)
    finally:
        server.stop()
    assert body["state"] == "succeeded"
    job_id = body["id"]
    assert body["url"] == f"{server.url}/jobs/{job_id}"
    assert body["output"]["result_url"] == f"{server.url}/jobs/{job_id}/result"

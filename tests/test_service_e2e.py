"""The assembled service, as `transcoder serve` runs it: a job's webhook reaches its receiver, signed."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

from serverproc import ServerProcess, wait_for


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_finished_job_is_posted_to_its_callback_signed(tmp_path: Path, clips) -> None:  # type: ignore[no-untyped-def]
    """A job created with callback_url is POSTed there once it succeeds, with an HMAC-SHA256 of the body under --webhook-secret."""
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Receiver.received = []
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/done?x=1"
    server = ServerProcess(tmp_path, "--webhook-secret", "s3cret")
    try:
        r = subprocess.run(
            ["curl", "-sS", "-T", str(clips.av),
             f"{server.url}/jobs?profile=mp4-h264&preset=ultrafast&callback_url={quote(hook, safe='')}"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job = json.loads(r.stdout)
        assert wait_for(lambda: len(Receiver.received) >= 1, timeout=60), server.output
        headers, body = Receiver.received[0]
        posted = json.loads(body)
        assert posted["id"] == job["id"]
        assert posted["state"] == "succeeded"
        want = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["x-transcoder-signature"] == want
        assert headers["x-transcoder-event"] == "job.finished"
    finally:
        server.stop()
        receiver.shutdown()
    assert len(Receiver.received) == 1

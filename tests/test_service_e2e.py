"""The assembled service, as `transcoder serve` runs it: a job's webhook reaches its receiver, signed; ffprobe runs under the library order learnt at start."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from serverproc import ServerProcess, wait_for

if TYPE_CHECKING:
    from conftest import Clips


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_finished_job_is_posted_to_its_callback_signed(tmp_path: Path, clips: Clips) -> None:
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


def test_a_webhook_pending_at_shutdown_is_sent_after_a_restart(tmp_path: Path) -> None:
    """A job's webhook that could not be delivered before the server stopped (its receiver was down) is delivered by the next server on the same data directory, with the same delivery id."""
    probe = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    port = probe.server_address[1]
    # Nothing listens there for now: every attempt is refused.
    probe.server_close()
    Receiver.received = []
    hook = f"http://127.0.0.1:{port}/done"
    garbage = tmp_path / "noise.bin"
    garbage.write_bytes(bytes(range(256)) * 4096)
    data = tmp_path / "data"
    server = ServerProcess(data)
    try:
        r = subprocess.run(
            ["curl", "-sS", "-T", str(garbage),
             f"{server.url}/jobs?profile=avi-mpeg4&callback_url={quote(hook, safe='')}"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job = json.loads(r.stdout)
        journal = data / "webhooks" / f"{job['id']}.json"
        # The job fails (not media), and its first attempt is refused.
        assert wait_for(lambda: "webhook of job" in server.output, timeout=30), server.output
        assert journal.exists()
    finally:
        assert server.stop() in (0, -15, 143)
    assert journal.exists()

    receiver = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    again = ServerProcess(data)
    try:
        assert wait_for(lambda: len(Receiver.received) >= 1, timeout=30), again.output
        headers, body = Receiver.received[0]
        posted = json.loads(body)
        assert posted["id"] == job["id"]
        assert posted["state"] == "failed"
        assert headers["x-transcoder-delivery"]
        assert wait_for(lambda: not journal.exists(), timeout=10)
    finally:
        again.stop()
        receiver.shutdown()
    assert len(Receiver.received) == 1


def test_ffprobe_runs_with_the_library_order_learnt_at_start(tmp_path: Path, clips: Clips) -> None:
    """
    The server learns ffprobe's library order at start (and says so in its
    log), and a two-input job, whose probes then run under it, succeeds.
    (That the registry's probes get the order is checked in test_probe.)
    """
    server = ServerProcess(tmp_path)
    try:
        assert wait_for(lambda: "libraries preloaded" in server.output, timeout=30), server.output
        r = subprocess.run(
            ["curl", "-sS", "-F", "profile=mux-avi", "-F", f"video=@{clips.flv_video}",
             "-F", f"audio=@{clips.mp3_audio}", f"{server.url}/jobs"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job = json.loads(r.stdout)
        states: list[str] = []

        def finished() -> bool:
            r = subprocess.run(
                ["curl", "-sS", f"{server.url}/jobs/{job['id']}?wait=30"],
                capture_output=True, timeout=60, check=True,
            )  # fmt: skip
            states.append(json.loads(r.stdout)["state"])
            return states[-1] not in ("queued", "running")

        assert wait_for(finished, timeout=60), states
        assert states[-1] == "succeeded", server.output
    finally:
        server.stop()

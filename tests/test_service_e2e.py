"""The assembled service, as `transcoder serve` runs it: a job's webhook reaches its receiver, signed; ffprobe runs under the library order learnt at start."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
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


class Failing(BaseHTTPRequestHandler):
    """A receiver that is always broken: every POST gets 500."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Failing.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _attempt_ended(server: ServerProcess) -> bool:
    return "failed (HTTP 500)" in server.output or "giving up" in server.output


def test_six_attempts_in_all_across_restarts(tmp_path: Path) -> None:
    """A webhook whose receiver always fails gets six POSTs in all, with one delivery id, however often the server restarts: the journal keeps the count (each restart here comes after the retry was due)."""
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Failing.received = []
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    garbage = tmp_path / "noise.bin"
    garbage.write_bytes(bytes(range(256)) * 4096)
    data = tmp_path / "data"
    journal = data / "webhooks"
    try:
        server = ServerProcess(data)
        try:
            r = subprocess.run(
                ["curl", "-sS", "-T", str(garbage),
                 f"{server.url}/jobs?profile=avi-mpeg4&callback_url={quote(hook, safe='')}"],
                capture_output=True, timeout=60, check=True,
            )  # fmt: skip
            entry = journal / f"{json.loads(r.stdout)['id']}.json"
            # The job fails (not media) and its first attempt gets 500.
            assert wait_for(lambda: "failed (HTTP 500)" in server.output, timeout=30), server.output
        finally:
            server.stop()
        for _ in range(7):
            pending = entry.exists()
            if pending:
                # As if the server had been down until the retry was due.
                record = json.loads(entry.read_text())
                record["due"] = 0
                entry.write_text(json.dumps(record))
            again = ServerProcess(data)
            try:
                if pending:
                    assert wait_for(partial(_attempt_ended, again), timeout=30), again.output
            finally:
                again.stop()
    finally:
        receiver.shutdown()
    assert len(Failing.received) == 6
    assert len({headers["x-transcoder-delivery"] for headers, _ in Failing.received}) == 1
    assert not entry.exists()


def _curl(*args: str) -> tuple[int, bytes]:
    """The status and body of one curl request."""
    r = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, timeout=60, check=True
    )
    body, _, status = r.stdout.rpartition(b"\n")
    return int(status), body


def test_a_result_changed_behind_the_servers_back_is_410(tmp_path: Path, clips: Clips) -> None:
    """On a real server, results of real encodes removed, cut short or replaced by a directory after their jobs succeeded: each download is a JSON 410 result_missing (never 500 or a short body under the old ETag), and each job says output.missing."""
    server = ServerProcess(tmp_path / "data")
    try:
        jobs = []
        for _ in range(3):
            status, body = _curl(
                "-T", str(clips.av), f"{server.url}/jobs?profile=mp4-h264&preset=ultrafast"
            )
            assert status == 201, body
            jobs.append(json.loads(body)["id"])
        for job_id in jobs:
            done: list[dict[str, Any]] = []

            def finished(job_id: str = job_id, done: list[dict[str, Any]] = done) -> bool:
                done.append(json.loads(_curl(f"{server.url}/jobs/{job_id}?wait=30")[1]))
                return done[-1]["state"] not in ("queued", "running")

            assert wait_for(finished, timeout=120), done
            assert done[-1]["state"] == "succeeded", server.output
            assert "missing" not in done[-1]["output"]
        results = [tmp_path / "data" / "jobs" / job_id / "result.mp4" for job_id in jobs]
        etag = f'"{json.loads(_curl(f"{server.url}/jobs/{jobs[1]}")[1])["output"]["sha256"]}"'
        results[0].unlink()
        with results[1].open("r+b") as f:
            f.truncate(1000)
        results[2].unlink()
        results[2].mkdir()
        for job_id in jobs:
            url = f"{server.url}/jobs/{job_id}/result"
            for extra in ([], ["-H", f"If-None-Match: {etag}"], ["-r", "0-99"]):
                status, body = _curl(*extra, url)
                assert status == 410, (extra, body)
                assert json.loads(body)["error"]["code"] == "result_missing"
            status, body = _curl(f"{server.url}/jobs/{job_id}")
            assert json.loads(body)["output"]["missing"] is True
        assert "Traceback" not in server.output
    finally:
        server.stop()

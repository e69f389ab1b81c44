"""
Webhooks across the nodes of a cluster (issue 16): a job's delivery lives in
the shared database, so that when the node that ran the job dies before
delivering it, another node does, with the same delivery id, and the
attempts of both count towards one limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from serverproc import ServerProcess, wait_for
from test_cluster_nodes import finished, node

if TYPE_CHECKING:
    from conftest import Clips


class _Receiver:
    """A webhook receiver on loopback: C{on_post(body)} picks the status of each POST."""

    def __init__(self, on_post: Any) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.times: list[float] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.posts.append((self.headers["X-Transcoder-Delivery"], body))
                receiver.times.append(time.monotonic())
                self.send_response(on_post(body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_another_node_delivers_when_the_first_dies(
    tmp_path: Path, clips: Clips, pg_dsn: str
) -> None:
    """The receiver answers the first POST of a job's webhook with 500 after kill -9 of the node that sent it (the node that ran the job): the other node delivers it, with the same X-Transcoder-Delivery id; the table counts 2 attempts for the two POSTs, and the delivery is settled, so no node sends it again."""
    import psycopg

    data = tmp_path / "data"
    servers: dict[str, ServerProcess] = {}

    def on_post(body: dict[str, Any]) -> int:
        if len(receiver.posts) == 1:
            os.kill(servers[body["node"]].pid, signal.SIGKILL)
            return 500
        return 200

    receiver = _Receiver(on_post)
    try:
        for name in ("one", "two"):
            servers[name] = node(data, tmp_path / f"{name}.log", pg_dsn, name, 1)
        r = subprocess.run(
            ["curl", "-sS", "-F", "profile=mux-avi", "-F", f"video=@{clips.flv_video}",
             "-F", f"audio=@{clips.mp3_audio}",
             f"{servers['one'].url}/jobs?callback_url={quote(receiver.url, safe='')}"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job_id = json.loads(r.stdout)["id"]
        # Past the kill, the receiver's 500 is never read: the delivery's claim lapses.
        assert wait_for(lambda: len(receiver.posts) >= 2, timeout=60), receiver.posts
        ran = receiver.posts[0][1]["node"]
        other = servers["two" if ran == "one" else "one"]
        assert finished(other, job_id)["state"] == "succeeded"
        assert [p[1]["id"] for p in receiver.posts] == [job_id, job_id]
        ids = {p[0] for p in receiver.posts}
        assert len(ids) == 1, receiver.posts
        assert wait_for(lambda: f"webhook of job {job_id} delivered" in other.output, timeout=10)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT delivery_id, attempts, outcome, claimed_by FROM webhooks WHERE job_id = %s",
                (job_id,),
            ).fetchone()
        assert row == (ids.pop(), 2, "delivered", None)
        assert len(receiver.posts) == 2
        print(f"second POST {receiver.times[1] - receiver.times[0]:.2f}s after the first")
    finally:
        receiver.close()
        for server in servers.values():
            server.stop()

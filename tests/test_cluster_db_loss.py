"""
A node that loses its PostgreSQL database (issue 16): within half a lease it
stops its encoders and refuses uploads with 503, /health says why, and once
the database is back it claims work again and the job, requeued when its
lease expired, completes.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serverproc import wait_for
from test_cluster_nodes import _gone_within, _noisy_clip, finished, node

if TYPE_CHECKING:
    from pg import Server

# test_cluster_nodes.LEASE: half of it plus a second is the bound on stopping.
LEASE = 2.0


def _health(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _upload(url: str, clip: Path) -> tuple[int, Any]:
    r = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-F", "profile=mp4-h264", "-F", "preset=slow",
         "-F", f"file=@{clip}", f"{url}/jobs"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    body, code = r.stdout.rsplit("\n", 1)
    return int(code), json.loads(body)


def test_a_node_without_its_database_stops_and_comes_back(
    tmp_path: Path, private_postgres: Server
) -> None:
    """PostgreSQL stopped (-m immediate) under a node running a long encode: the encoder is gone within half a lease plus a second, uploads get 503 store_unavailable and /health 503 store_failing meanwhile; once PostgreSQL is started again, /health is ok, and the job, requeued when its lease expired, runs again here as attempt 2 and succeeds."""
    import psycopg

    dsn = f"postgresql://postgres@127.0.0.1:{private_postgres.port}/postgres"
    data = tmp_path / "data"
    clip = _noisy_clip(tmp_path / "noisy.avi", 4)
    server = node(data, tmp_path / "node.log", dsn, "only", 1)
    pgid: int | None = None
    try:
        code, job = _upload(server.url, clip)
        assert code == 201, job
        job_id = job["id"]
        deadline = time.monotonic() + 60
        with psycopg.connect(dsn, autocommit=True) as conn:
            while pgid is None:
                assert time.monotonic() < deadline
                row = conn.execute("SELECT record->>'pid' FROM jobs WHERE id = %s", (job_id,))
                found = row.fetchone()
                pgid = int(found[0]) if found and found[0] else None
                time.sleep(0.1)

        stopped = time.monotonic()
        private_postgres.stop("immediate")
        assert _gone_within(pgid, LEASE / 2 + 1), f"encoder {pgid} still runs without its database"
        print(f"encoder gone {time.monotonic() - stopped:.2f}s after the database stopped")
        status, health = _health(server.url)
        assert (status, health["status"]) == (503, "store_failing"), health
        assert "did not answer" in health["store_error"], health
        code, refused = _upload(server.url, clip)
        assert (code, refused["error"]["code"]) == (503, "store_unavailable"), refused
        assert sorted(p.name for p in (data / "uploads").iterdir()) == []

        private_postgres.start()
        restarted = time.monotonic()
        assert wait_for(lambda: _health(server.url)[0] == 200, timeout=30), _health(server.url)
        print(f"/health ok {time.monotonic() - restarted:.2f}s after the database started")
        job = finished(server, job_id, timeout=180)
        assert (job["state"], job["node"], job["attempt"]) == ("succeeded", "only", 2), job
        assert (data / "jobs" / job_id / "result.2.mp4").stat().st_size == job["output"]["size"]
        log = server.output
        assert "stopping its encoder, the job database cannot be reached" in log
    finally:
        server.stop()

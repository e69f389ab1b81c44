"""
Retention on a cluster (issue 16): sweeps run on one node at a time, under
an advisory lock, so that each old job and its files are removed once.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from serverproc import ServerProcess, serve, wait_for
from test_cluster_nodes import LEASE, finished, upload

from transcoder.core.pgside import RETENTION_LOCK

if TYPE_CHECKING:
    from conftest import Clips


def _gone(server: ServerProcess, job_id: str) -> bool:
    try:
        urllib.request.urlopen(f"{server.url}/jobs/{job_id}", timeout=30).close()
    except urllib.error.HTTPError as e:
        # Removed by retention: "expired" on every node (the tombstone is in the shared data dir).
        return e.code == 410 and json.load(e)["error"]["code"] == "expired"
    return False


def test_one_node_sweeps_at_a_time(tmp_path: Path, clips: Clips, pg_dsn: str) -> None:
    """Two nodes with --keep-results 1s: while another session holds the retention lock, neither removes two finished jobs, past their time; once it is released, each job and its directory are removed, once in all, and the job answers 410 expired on both nodes (the nodes' logs count 2 deletions), with no error logged."""
    import psycopg

    data = tmp_path / "data"
    servers: list[ServerProcess] = []
    with psycopg.connect(pg_dsn, autocommit=True) as other:
        try:
            for name in ("one", "two"):
                servers.append(
                    serve(data, tmp_path / f"{name}.log", "--store", pg_dsn, "--node-name", name,
                          "--workers", "1", "--lease", LEASE, "--keep-results", "1s")
                )  # fmt: skip
            # As if a third node were sweeping.
            other.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK,))
            ids = [upload(servers[i], clips) for i in range(2)]
            for job_id in ids:
                assert finished(servers[0], job_id)["state"] == "succeeded"
            # Kept 1 s, swept every second: both nodes have looked twice by now.
            time.sleep(3)
            for job_id in ids:
                assert (data / "jobs" / job_id).is_dir()
                assert not any(_gone(s, job_id) for s in servers)

            other.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK,))
            for job_id in ids:
                assert wait_for(lambda j=job_id: all(_gone(s, j) for s in servers), timeout=10)
                assert not (data / "jobs" / job_id).exists()
        finally:
            for server in servers:
                server.stop()
    logs = "".join(s.output for s in servers)
    deleted = [int(n) for n in re.findall(r"retention: deleted (\d+) jobs", logs)]
    assert sum(deleted) == 2, deleted
    assert "#critical]" not in logs and "#error]" not in logs, logs

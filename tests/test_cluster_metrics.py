"""
Metrics on a cluster (issue 16): each node its own, plus the cluster's
gauges (queued jobs, running jobs per node) read from the shared store.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, wait_for
from test_cluster_nodes import _noisy_clip, node


def _scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_node_and_the_cluster(tmp_path: Path, pg_dsn: str) -> None:
    """An encoder node (1 worker) and an ingest node (0 workers): with a long job running on the encoder node and a second queued, both nodes' /metrics show the cluster's 1 queued and running 1 on enc, 0 on ingest; each node's own transcoder_running_encoders is 1 on enc and 0 on ingest."""
    data = tmp_path / "data"
    clip = _noisy_clip(tmp_path / "noisy.avi", 30)
    servers: list[ServerProcess] = []
    try:
        enc = node(data, tmp_path / "enc.log", pg_dsn, "enc", 1)
        servers.append(enc)
        ingest = node(data, tmp_path / "ingest.log", pg_dsn, "ingest", 0)
        servers.append(ingest)
        for _ in range(2):
            subprocess.run(
                ["curl", "-sS", "-F", "profile=mp4-h264", "-F", "preset=slow",
                 "-F", f"file=@{clip}", f"{ingest.url}/jobs"],
                capture_output=True, timeout=60, check=True,
            )  # fmt: skip
        expected = {
            ("transcoder_cluster_queued_jobs", ()): 1.0,
            ("transcoder_cluster_running_jobs", (("node", "enc"),)): 1.0,
            ("transcoder_cluster_running_jobs", (("node", "ingest"),)): 0.0,
        }

        def shows(server: ServerProcess, running_here: float) -> bool:
            got = _scrape(server)
            cluster = {k: v for k, v in got.items() if k[0].startswith("transcoder_cluster_")}
            return cluster == expected and got[("transcoder_running_encoders", ())] == running_here

        assert wait_for(lambda: shows(enc, 1.0), timeout=30), _scrape(enc)
        assert wait_for(lambda: shows(ingest, 0.0), timeout=5), _scrape(ingest)
        jobs = json.loads(urllib.request.urlopen(f"{ingest.url}/jobs", timeout=30).read())
        assert sorted(j["state"] for j in jobs["jobs"]) == ["queued", "running"]
    finally:
        for server in servers:
            server.stop()

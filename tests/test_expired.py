"""
A job removed by retention (C{--keep-results}) answers 410 C{expired}, saying so,
not a bare 404: L{transcoder.core.tombstones} and its use by the sweeper and the API.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from conftest import Clips
from serverproc import serve, wait_for
from test_api import Reply, conform
from test_retention import T0, Env, env  # noqa: F401 (a fixture)

from transcoder.core.jobs import new_job_id
from transcoder.core.retention import RetentionSweeper
from transcoder.core.tombstones import TOMBSTONE_KEEP, Tombstones


def test_the_sweeper_records_what_it_removes(env: Env, tmp_path: Path) -> None:  # noqa: F811
    """Each job the sweeper removes leaves a tombstone with its owner, when it finished, when it was removed and the keep it was removed under; jobs it keeps leave none."""
    stones = Tombstones(tmp_path / "expired")
    old = env.add()
    old.owner = "alice"
    env.executor.finish(old)
    finished = env.clock.seconds()
    env.clock.advance(60)
    young = env.add()
    env.executor.finish(young)
    env.clock.advance(50)
    sweeper = RetentionSweeper(env.clock, env.registry, keep=100, interval=30, tombstones=stones)
    assert sweeper.sweep().result == 1
    stone = stones.find(old.id)
    assert stone is not None
    assert (stone.owner, stone.finished_at, stone.removed_at, stone.kept) == (
        "alice", finished, T0 + 110, 100.0,
    )  # fmt: skip
    assert stones.find(young.id) is None
    assert stones.find(new_job_id()) is None
    assert stones.find("../../etc/passwd") is None


def test_tombstones_are_pruned_after_their_keep(tmp_path: Path, env: Env) -> None:  # noqa: F811
    """A tombstone goes once TOMBSTONE_KEEP has passed since the removal, at the latest after one prune per shard (256); a younger one stays."""
    stones = Tombstones(tmp_path / "expired")
    old, young = env.add(), env.add()
    stones.bury(old, T0, 100)
    stones.bury(young, T0 + 10, 100)
    now = T0 + TOMBSTONE_KEEP + 5
    assert sum(stones.prune(now) for _ in range(256)) == 1
    assert stones.find(old.id) is None
    assert stones.find(young.id) is not None


def test_a_tombstone_that_cannot_be_written_does_not_stop_the_removal(
    env: Env,  # noqa: F811
    tmp_path: Path,
) -> None:
    """When the tombstone cannot be written (here its directory is a file), the job is removed anyway: retention is what frees a full disk."""
    (tmp_path / "expired").write_text("not a directory")
    job = env.add()
    env.executor.finish(job)
    env.clock.advance(200)
    sweeper = RetentionSweeper(
        env.clock, env.registry, keep=100, tombstones=Tombstones(tmp_path / "expired")
    )
    assert sweeper.sweep().result == 1
    assert env.registry.get(job.id) is None


def _call(url: str, method: str = "GET", token: str | None = None) -> Reply:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def test_a_removed_job_answers_410_expired(tmp_path: Path, clips: Clips) -> None:
    """With --keep-results 1s on a real server, a finished job is soon removed; then its status, its result, its log and a DELETE answer 410 `expired` with a message saying it expired under --keep-results, as docs/openapi.yaml says; another token gets a plain 404, and so does an id that never existed."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token\nbob:bob-token\n")
    server = serve(
        tmp_path / "data", tmp_path / "server.log", "--keep-results", "1s", "--tokens", str(tokens)
    )
    try:
        up = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "-H", "Authorization: Bearer alice-token",
             "-T", str(clips.mp3_audio), f"{server.url}/jobs?profile=audio-mp3&abitrate=64"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        job_id = json.loads(up.stdout)["id"]
        job_url = f"{server.url}/jobs/{job_id}"
        assert _call(job_url, token="alice-token").code == 200
        assert wait_for(lambda: _call(job_url, token="alice-token").code == 410, timeout=60)
        gone = _call(job_url, token="alice-token")
    finally:
        server.stop()
    conform("GET", f"/jobs/{job_id}", gone)
    error = gone.json()["error"]
    assert error["code"] == "expired"
    assert "expired" in error["message"] and "--keep-results" in error["message"]
    assert "1s" in error["message"] and job_id in error["message"]
    assert not (tmp_path / "data" / "jobs" / job_id).exists()
    server = serve(
        tmp_path / "data", tmp_path / "server2.log", "--keep-results", "1s", "--tokens", str(tokens)
    )
    try:
        # Across a restart, and on every path under the job.
        for method, path in [("GET", ""), ("GET", "/result"), ("GET", "/log"), ("DELETE", "")]:
            reply = _call(f"{server.url}/jobs/{job_id}{path}", method, token="alice-token")
            assert (reply.code, reply.json()["error"]["code"]) == (410, "expired"), path
            conform(method, f"/jobs/{job_id}{path}", reply)
        other = _call(f"{server.url}/jobs/{job_id}", token="bob-token")
        assert (other.code, other.json()["error"]["code"]) == (404, "not_found")
        never = _call(f"{server.url}/jobs/{new_job_id()}", token="alice-token")
        assert (never.code, never.json()["error"]["code"]) == (404, "not_found")
    finally:
        server.stop()
    assert os.path.isdir(tmp_path / "data" / "expired")

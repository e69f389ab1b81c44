"""Real tus clients nobody here wrote, against a real server: tuspy from PyPI."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, random_file
from tusclient.client import TusClient


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("tus-clients"), "--workers", "0")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def test_tuspy_stopped_half_way_and_resumed_by_another_client(
    server: ServerProcess, tmp_path: Path
) -> None:
    """tuspy uploads in 1 MiB chunks, stops half-way; a second client resumes from the upload's URL; the job's SHA-256 is the file's."""
    path = random_file(tmp_path / "movie.flv", 5 << 20)
    first = TusClient(server.url + "/uploads")
    uploader = first.uploader(
        str(path),
        chunk_size=1 << 20,
        metadata={"profile": "mp4-h264", "filename": "movie.flv"},
    )
    uploader.upload(stop_at=(5 << 20) // 2)
    assert uploader.url is not None
    assert 0 < uploader.offset < (5 << 20)
    second = TusClient(server.url + "/uploads")
    resumed = second.uploader(str(path), chunk_size=1 << 20, url=uploader.url)
    assert resumed.offset == uploader.offset
    resumed.upload()
    assert resumed.offset == 5 << 20
    head = urllib.request.Request(uploader.url, method="HEAD", headers={"Tus-Resumable": "1.0.0"})
    with urllib.request.urlopen(head) as answer:
        job_location = answer.headers["Job-Location"]
    with urllib.request.urlopen(server.url + job_location) as answer:
        job = json.load(answer)
    assert job["inputs"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

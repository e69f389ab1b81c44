"""tus-js-client (npm, pinned in tests/js/package-lock.json) under Node against a real server."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, random_file
from tusraw import call

JS = Path(__file__).resolve().parent / "js"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("tus-js"), "--workers", "0")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def node(server: ServerProcess, path: Path, mode: str, url: str = "") -> dict[str, object]:
    args = ["node", str(JS / "tus_upload.js"), server.url + "/uploads", str(path), mode]
    out = subprocess.run(
        args + ([url] if url else []), capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    answer: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return answer


def job_sha(server: ServerProcess, location: object) -> str:
    assert isinstance(location, str)
    inputs = call(server.port, "GET", location, tus=False).json()["inputs"]
    return str(inputs[0]["sha256"])


def test_tus_js_client_creation_with_upload(server: ServerProcess, tmp_path: Path) -> None:
    """tus-js-client with uploadDataDuringCreation sends the first chunk in the POST and finishes with PATCHes; the job has the file's SHA-256."""
    path = random_file(tmp_path / "movie.flv", (3 << 20) + 12345)
    answer = node(server, path, "create")
    assert answer["jobLocation"]
    assert job_sha(server, answer["jobLocation"]) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tus_js_client_aborted_then_resumed(server: ServerProcess, tmp_path: Path) -> None:
    """tus-js-client aborted half-way leaves the upload at its offset; another run resumes from the upload URL to the right job."""
    path = random_file(tmp_path / "movie.flv", 4 << 20)
    half = node(server, path, "half")
    url = half["url"]
    assert isinstance(url, str) and half["jobLocation"] is None
    resumed = node(server, path, "resume", url)
    assert resumed["url"] == url and resumed["jobLocation"]
    assert job_sha(server, resumed["jobLocation"]) == hashlib.sha256(path.read_bytes()).hexdigest()

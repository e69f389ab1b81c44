"""
A multi-output job through a real server (issue 17): the job JSON lists every
output and describes its input; each output downloads from
/jobs/<id>/outputs/<name> with ranges, ETag and 410 when gone; an HLS master
plays over HTTP through its relative URLs (and ffprobe reads it from its URL);
/result is a stored zip of every output, same bytes, in flat memory; names
outside the job's outputs are 404.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import pytest
from serverproc import ServerProcess, wait_for

if TYPE_CHECKING:
    from conftest import Clips


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _submit(server: ServerProcess, clip: Path, query: str) -> dict[str, Any]:
    r = subprocess.run(
        ["curl", "-sS", "-T", str(clip), f"{server.url}/jobs?filename=clip.mp4&{query}"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    job: dict[str, Any] = json.loads(r.stdout)
    done: dict[str, Any] = {}

    def finished() -> bool:
        done.update(json.loads(_get(f"{server.url}/jobs/{job['id']}?wait=5")[2]))
        return done["state"] not in ("queued", "running")

    assert wait_for(finished, timeout=120), server.output
    assert done["state"] == "succeeded", done
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = ServerProcess(tmp_path_factory.mktemp("data"))
    yield s
    s.stop()


def test_hls_job_plays_through_its_relative_urls(server: ServerProcess, clips: Clips) -> None:
    """An hls job lists master, rendition playlists and segments with size, sha256, media type and URL; the master's relative URLs lead to a rendition playlist and its segments over HTTP; ffprobe on the master URL reads 3 s of H.264 and AAC; the input is described (mov container, 3 s, h264 320x240 at 25 fps, aac 44100 Hz)."""
    job = _submit(server, clips.av, "profile=hls&rungs=240p,720p&segment_seconds=2")
    assert job["output"] is None
    outputs = {o["name"]: o for o in job["outputs"]}
    assert {"master.m3u8", "240p/index.m3u8"} <= set(outputs)
    assert not any(n.startswith("720p") for n in outputs)
    for o in outputs.values():
        assert o["url"] == f"/jobs/{job['id']}/outputs/{o['name']}"
    master_url = f"{server.url}{outputs['master.m3u8']['url']}"
    status, headers, master = _get(master_url)
    assert status == 200 and headers["content-type"] == "application/vnd.apple.mpegurl"
    assert headers["etag"] == f'"{outputs["master.m3u8"]["sha256"]}"'
    rendition = next(
        line for line in master.decode().splitlines() if line and not line.startswith("#")
    )
    status, _, playlist = _get(urljoin(master_url, rendition))
    assert status == 200 and playlist.startswith(b"#EXTM3U")
    segment = next(
        line for line in playlist.decode().splitlines() if line and not line.startswith("#")
    )
    status, headers, body = _get(urljoin(urljoin(master_url, rendition), segment))
    assert status == 200 and headers["content-type"] == "video/mp2t"
    assert hashlib.sha256(body).hexdigest() == outputs["240p/" + segment]["sha256"]
    probed = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", master_url],
        capture_output=True, timeout=60, check=True,
    ).stdout)  # fmt: skip
    assert abs(float(probed["format"]["duration"]) - 3.0) < 0.3
    assert {s["codec_name"] for s in probed["streams"]} >= {"h264", "aac"}
    media = job["inputs"][0]["media"]
    assert media["container"].startswith("mov") and abs(media["duration"] - 3.0) < 0.1
    assert media["streams"] == [
        {"type": "video", "codec": "h264", "width": 320, "height": 240, "frame_rate": 25.0},
        {"type": "audio", "codec": "aac", "sample_rate": 44100, "channels": 1},
    ]


def test_outputs_range_names_and_zip(server: ServerProcess, clips: Clips, tmp_path: Path) -> None:
    """thumbnails: an output answers a Range with 206, its ETag with 304; names not among the outputs (traversal, encoded slashes, the log) are 404; /result is a zip, stored, whose files are the outputs' bytes, with a Content-Length; a removed output is 410 on its URL and on /result, and marked missing."""
    job = _submit(server, clips.av, "profile=thumbnails&count=3")
    outputs = {o["name"]: o for o in job["outputs"]}
    assert sorted(outputs) == ["poster.jpg", "thumb-001.jpg", "thumb-002.jpg", "thumb-003.jpg"]
    base = f"{server.url}/jobs/{job['id']}"
    status, headers, part = _get(f"{base}/outputs/poster.jpg", {"Range": "bytes=0-9"})
    assert (
        status == 206
        and len(part) == 10
        and headers["content-range"].endswith(f"/{outputs['poster.jpg']['size']}")
    )
    assert 'filename="poster.jpg"' in headers["content-disposition"]
    status, _, _ = _get(f"{base}/outputs/poster.jpg", {"If-None-Match": headers["etag"]})
    assert status == 304
    for bad in (
        "../encoder.log",
        "%2E%2E/encoder.log",
        "..%2Fencoder.log",
        "outputs/poster.jpg",
        "nope.jpg",
        "",
        "poster.jpg/x",
    ):
        status, _, body = _get(f"{base}/outputs/{bad}")
        assert status in (404, 400), (bad, status)
        if status == 404:
            assert json.loads(body)["error"]["code"] == "not_found"
    status, headers, body = _get(f"{base}/result")
    assert status == 200 and headers["content-type"] == "application/zip"
    assert int(headers["content-length"]) == len(body)
    assert headers["content-disposition"].endswith('"clip.zip"')
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert sorted(z.namelist()) == sorted(outputs)
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert hashlib.sha256(z.read(info)).hexdigest() == outputs[info.filename]["sha256"]
    (server.data_dir / "jobs" / job["id"] / "outputs" / "thumb-002.jpg").unlink()
    assert _get(f"{base}/outputs/thumb-002.jpg")[0] == 410
    status, _, body = _get(f"{base}/result")
    assert status == 410 and json.loads(body)["error"]["code"] == "result_missing"
    view = json.loads(_get(base)[2])
    assert [o["name"] for o in view["outputs"] if o.get("missing")] == ["thumb-002.jpg"]


def test_one_output_job_keeps_its_result_and_lists_it(server: ServerProcess, clips: Clips) -> None:
    """A one-output job keeps `output` and its /result as before, and lists it in `outputs` as result.<ext>, served the same."""
    job = _submit(server, clips.av, "profile=audio-aac")
    assert job["output"]["result_url"] == f"/jobs/{job['id']}/result"
    [listed] = job["outputs"]
    assert listed["name"] == "result.m4a" and listed["sha256"] == job["output"]["sha256"]
    _, headers, result = _get(f"{server.url}/jobs/{job['id']}/result")
    _, headers2, same = _get(f"{server.url}{listed['url']}")
    assert result == same and headers["etag"] == headers2["etag"]


def test_zip_of_a_big_output_set_streams_in_flat_memory(tmp_path: Path, clips: Clips) -> None:
    """/result of a job with 6 outputs of 64 MiB each streams a 384 MiB zip whose RSS rise on the server stays under 40 MiB, and it extracts to the same bytes."""
    profiles = tmp_path / "p.toml"
    profiles.write_text(
        """
[blobs]
executable = "sh"
argv = ["-c", "for i in 1 2 3 4 5 6; do head -c 67108864 /dev/urandom > \\"$2/blob-$i.bin\\"; done", "sh", "{file}", "{output_dir}"]
outputs = [{ name = "blob-*.bin", check = "none", count = 6 }]
"""
    )
    server = ServerProcess(tmp_path / "data", "--profiles", str(profiles))
    try:
        r = subprocess.run(
            ["curl", "-sS", "-T", str(clips.av), f"{server.url}/jobs?profile=blobs"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job_id = json.loads(r.stdout)["id"]
        job: dict[str, Any] = {}

        def finished() -> bool:
            job.update(json.loads(_get(f"{server.url}/jobs/{job_id}?wait=5")[2]))
            return job["state"] not in ("queued", "running")

        assert wait_for(finished, timeout=120), server.output
        assert job["state"] == "succeeded", job
        before = server.rss()
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], server.rss())

        threading.Thread(target=sample, daemon=True).start()
        out = tmp_path / "all.zip"
        subprocess.run(
            [
                "curl",
                "-sS",
                "--limit-rate",
                "200M",
                "-o",
                str(out),
                f"{server.url}/jobs/{job_id}/result",
            ],
            check=True,
            timeout=300,
        )
        stop.set()
        assert out.stat().st_size > 6 * 64 * 1024 * 1024
        assert peak[0] - before < 40 * 1024 * 1024, (before, peak[0])
        with zipfile.ZipFile(out) as z:
            for o in job["outputs"]:
                digest = hashlib.sha256()
                with z.open(o["name"]) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                assert digest.hexdigest() == o["sha256"]
    finally:
        server.stop()

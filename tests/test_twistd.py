"""
Deployment with twistd: the C{transcoder} plugin, C{tap.py} and C{twistd web
--class transcoder.webfactory.resource}, each run as a real process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from serverproc import LISTEN, REPO, ServerProcess, processes_mentioning, random_file, start, twistd
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from zope.interface.verify import verifyObject

from transcoder._env import env_argv, options_from_env
from transcoder.client import Client
from transcoder.service import Options

MiB = 1 << 20
WEB_CLASS = ["--class", "transcoder.webfactory.resource"]


def _plugin() -> Any:
    found = [p for p in getPlugins(IServiceMaker) if p.tapname == "transcoder"]
    assert len(found) == 1, [p.tapname for p in getPlugins(IServiceMaker)]
    return found[0]


def test_plugin_discovered_with_the_service_options() -> None:
    """getPlugins finds the transcoder IServiceMaker; its options are the service's Options."""
    maker = _plugin()
    verifyObject(IServiceMaker, maker)
    verifyObject(IPlugin, maker)
    options = maker.options()
    assert isinstance(options, Options)
    options.parseOptions(
        ["--listen", "tcp:9999", "--data-dir", "/srv/x", "--workers", "3", "--shutdown-grace", "2m"]
    )
    assert options["listen"] == "tcp:9999"
    assert options["data-dir"] == "/srv/x"
    assert options["workers"] == 3
    assert options["shutdown-grace"] == 120.0
    with pytest.raises(usage.UsageError):
        maker.options().parseOptions(["--max-upload-size", "lots"])


def test_twistd_help_lists_the_plugin_from_any_directory(tmp_path: Path) -> None:
    """`twistd --help`, run outside the checkout, lists `transcoder`; its own --help shows the options."""
    listing = subprocess.run(
        [twistd(), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:1] == ["transcoder"] for line in listing.stdout.splitlines())
    helped = subprocess.run(
        [twistd(), "transcoder", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    for option in ("--listen", "--data-dir", "--shutdown-grace", "--max-upload-size"):
        assert option in helped.stdout


def test_env_argv_maps_variables_to_options() -> None:
    """TRANSCODER_* variables become the options' argv; client variables and empty ones are skipped."""
    argv = env_argv(
        {
            "TRANSCODER_LISTEN": "tcp:1234",
            "TRANSCODER_DATA_DIR": "/d",
            "TRANSCODER_MAX_UPLOAD_SIZE": "2G",
            "TRANSCODER_TOKENS": "",
            "TRANSCODER_URL": "http://x",
            "TRANSCODER_TOKEN": "t",
            "PATH": "/bin",
        }
    )
    assert sorted(argv) == ["--data-dir=/d", "--listen=tcp:1234", "--max-upload-size=2G"]
    options = options_from_env({"TRANSCODER_DATA_DIR": "/d", "TRANSCODER_WORKERS": "5"})
    assert options["data-dir"] == "/d"
    assert options["workers"] == 5
    assert options["listen"] == Options()["listen"]


def test_env_errors_name_the_variable() -> None:
    """A misspelt variable, or a value the option refuses, is an error that says which."""
    with pytest.raises(usage.UsageError, match="TRANSCODER_DATADIR"):
        env_argv({"TRANSCODER_DATADIR": "/d"})
    with pytest.raises(usage.UsageError, match="--max-upload-size=huge"):
        options_from_env({"TRANSCODER_MAX_UPLOAD_SIZE": "huge"})


def test_tap_py_refuses_bad_variables(tmp_path: Path) -> None:
    """`twistd -ny tap.py` with a misspelt variable exits 2 and names it, before listening."""
    env = {"PATH": "/usr/bin:/bin", "TRANSCODER_DATADIR": str(tmp_path)}
    result = subprocess.run(
        [twistd(), "-n", "--pidfile=", "-y", str(REPO / "tap.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "TRANSCODER_DATADIR" in result.stderr


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _wait_for(client: Client, job_id: str, predicate: Any, timeout: float = 60) -> Any:
    for _ in range(int(timeout / 0.1)):
        job = await client.get(job_id)
        if predicate(job):
            return job
        await _sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {job}")


def _assert_stopped_cleanly(server: ServerProcess) -> None:
    """
    twistd re-raises the signal that stopped it once shutdown is complete, so
    that supervisors see it (systemd counts SIGTERM as a clean stop): the exit
    status is -SIGTERM, after the log's last word.
    """
    code = server.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), (code, server.log_text())
    log = server.log_text()
    assert "Server Shut Down." in log, log
    assert "Traceback" not in log, log
    assert processes_mentioning(str(server.data_dir)) == []


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 s of 640x360 video and audio: long enough to be mid-encode at `veryslow`."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-v", "error", "-y"),
            *("-f", "lavfi", "-i", "testsrc=size=640x360:rate=25:duration=60"),
            *("-f", "lavfi", "-i", "sine=frequency=440:duration=60"),
            *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"),
            *("-c:a", "aac", "-shortest", str(path)),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return path


@pytest_twisted.ensureDeferred
async def test_twistd_transcoder_serves_then_stops_encoders_on_sigterm(
    tmp_path: Path, clips: Any, long_clip: Path
) -> None:
    """
    `twistd -n transcoder` serves an upload to completion; SIGTERM during an
    encode stops the encoder and shuts down completely; started again on the
    same data dir, it runs the interrupted job to success.
    """
    data = tmp_path / "data"
    argv = [twistd(), "-n", "--pidfile=", "transcoder", "--listen", LISTEN, "--data-dir", str(data)]
    server = start(argv, data, tmp_path / "twistd.log")
    client = Client(server.url)
    try:
        mux = await client.submit({"video": clips.flv_video, "audio": clips.mp3_audio}, "mux-avi")
        assert (await client.wait(mux.id)).state == "succeeded"
        slow = await client.submit(long_clip, "mp4-h264", {"preset": "veryslow"})
        await _wait_for(client, slow.id, lambda j: j.state == "running" and j.progress > 0)
        assert processes_mentioning(str(data / "jobs")) != []
        await client.close()
        _assert_stopped_cleanly(server)

        server = start(argv, data, tmp_path / "twistd-2.log")
        client = Client(server.url)
        done = await client.wait(slow.id)
        assert done.state == "succeeded", done.data
        _assert_stopped_cleanly(server)
    finally:
        await client.close()
        server.kill()


@pytest_twisted.ensureDeferred
async def test_twistd_tap_py_serves_and_stops(tmp_path: Path, clips: Any) -> None:
    """`twistd -ny tap.py`, configured by TRANSCODER_* variables, serves a job and stops on SIGTERM."""
    data = tmp_path / "data"
    env = {"TRANSCODER_LISTEN": LISTEN, "TRANSCODER_DATA_DIR": str(data), "TRANSCODER_WORKERS": "1"}
    server = start(
        [twistd(), "-n", "--pidfile=", "-y", str(REPO / "tap.py")], data, tmp_path / "tap.log", env
    )
    client = Client(server.url)
    try:
        job = await client.submit(clips.av, "avi-mpeg4", {"vbitrate": 800})
        done = await client.wait(job.id)
        assert done.state == "succeeded", done.data
        assert done.params["vbitrate"] == 800
        assert (data / "jobs.sqlite3").exists()
        assert "1 workers" in server.log_text()
        await client.close()
        _assert_stopped_cleanly(server)
    finally:
        await client.close()
        server.kill()


@pytest_twisted.ensureDeferred
async def test_twistd_web_class_serves_with_the_registry_running(
    tmp_path: Path, clips: Any
) -> None:
    """`twistd web --class transcoder.webfactory.resource` serves uploads and runs their jobs."""
    data = tmp_path / "data"
    server = start(
        [twistd(), *("-n", "--pidfile=", "web", "--listen", LISTEN), *WEB_CLASS],
        data,
        tmp_path / "web.log",
        {"TRANSCODER_DATA_DIR": str(data)},
    )
    client = Client(server.url)
    try:
        job = await client.submit(clips.av, "mp4-h264", {"preset": "ultrafast"})
        done = await client.wait(job.id)
        assert done.state == "succeeded", done.data
        await client.close()
        _assert_stopped_cleanly(server)
    finally:
        await client.close()
        server.kill()


def _curl_upload(url: str, *args: str) -> dict[str, Any]:
    import json

    result = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    body, _, status = result.stdout.rpartition("\n")
    return {"status": int(status), "body": json.loads(body) if body.strip() else None}


def _upload_costs(server: ServerProcess, file: Path) -> dict[str, float]:
    """Peak RSS growth (MiB) of the server for a raw and a multipart upload of C{file}."""
    url = server.url + "/jobs?profile=avi-mpeg4"
    # Warm up: the first request imports and allocates what every later one reuses.
    _curl_upload(url, "-T", str(REPO / "pyproject.toml"))
    costs: dict[str, float] = {}
    for name, args in (("raw", ["-T", str(file)]), ("multipart", ["-F", f"file=@{file}"])):
        assert server.reset_peak()
        base = server.peak_rss()
        answer = _curl_upload(url, *args)
        costs[name] = (server.peak_rss() - base) / (1 << 20)
        costs[name + "_status"] = answer["status"]
    return costs


def test_upload_memory_twistd_web_versus_the_plugin(tmp_path: Path) -> None:
    """
    Server peak-RSS growth for a 100 MiB raw and a 100 MiB multipart upload
    (curl -T / curl -F) under `twistd transcoder` stays small, while stock
    `twistd web` parses the multipart body into memory (docs/deployment.md
    records the figures this prints).
    """
    file = random_file(tmp_path / "upload.bin", 100 * MiB)
    figures = {}
    for kind in ("plugin", "web"):
        data = tmp_path / f"data-{kind}"
        if kind == "plugin":
            argv = [twistd(), "-n", "--pidfile=", "transcoder", "--listen", LISTEN]
            argv += ["--data-dir", str(data)]
            env = {}
        else:
            argv = [twistd(), "-n", "--pidfile=", "web", "--listen", LISTEN]
            argv += WEB_CLASS
            env = {"TRANSCODER_DATA_DIR": str(data)}
        server = start(argv, data, tmp_path / f"{kind}.log", env)
        try:
            figures[kind] = _upload_costs(server, file)
        finally:
            server.stop()
            server.kill()
    print(f"\nupload peak RSS growth, MiB: {figures}", file=sys.stderr)
    plugin, web = figures["plugin"], figures["web"]
    assert plugin["raw_status"] == 201 and plugin["multipart_status"] == 201, plugin
    assert plugin["raw"] < 40 and plugin["multipart"] < 40, figures
    # The stock Site's form parsing holds the whole multipart body (and more) in memory.
    assert web["multipart"] > 100, figures

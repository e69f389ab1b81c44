"""
transcoder.client.Blocking, the client for programs that are not Twisted
ones, run as such a program: a plain script in a subprocess (so that its
reactor thread is its own, not pytest-twisted's), against a real server.
"""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess, no_uploads_left, random_file, serve, wait_for

_SCRIPT = """
import hashlib, json, sys, threading
from pathlib import Path
from twisted.internet.error import ConnectError
from transcoder.client import Blocking, CannotConnect, TranscoderError

url, clip, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
report = {}
with Blocking(url) as client:
    report["health"] = client.health()["status"]
    report["profiles"] = sorted(p["name"] for p in client.profiles())
    sent = []
    job = client.submit(
        clip, "mp4-h264", {"preset": "ultrafast"}, on_progress=lambda s, t: sent.append([s, t]),
        filename="renamed.mp4",
    )
    report["sent"] = sent[-1]
    report["filename"] = job.inputs[0]["filename"]
    job = client.wait(job.id)
    report["state"] = job.state
    path = client.download(job.id, out)
    report["digest_ok"] = hashlib.sha256(path.read_bytes()).hexdigest() == job.output["sha256"]
    report["log"] = bool(client.log(job.id).strip())
    report["listed"] = job.id in [j.id for j in client.jobs(page_size=1)]
    client.cancel(job.id)
    try:
        client.get(job.id)
    except TranscoderError as e:
        report["after_cancel"] = [e.status, e.code]
with Blocking("http://127.0.0.1:9") as nowhere:
    try:
        nowhere.health()
    except TranscoderError as e:
        report["unreachable"] = [type(e).__name__, isinstance(e, ConnectError), e.url, str(e)]
class Counting(Blocking):
    def close(self):
        report["closed"] = report.get("closed", 0) + 1
        super().close()
try:
    with Counting(url):
        raise ValueError("the block fails")
except ValueError:
    pass
report["threads"] = sorted(t.name for t in threading.enumerate())
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("blocking-server")
    proc = serve(d / "data", d / "serve.log")
    yield proc
    proc.stop()


def _python(script: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        **kw,
    )


def test_blocking_client_in_a_plain_script(
    server: ServerProcess, clips: Any, tmp_path: Path
) -> None:
    """
    A script with no Twisted in sight: `with Blocking(url) as client:` then
    health, profiles, submit (with progress and filename=), wait, download
    (the digest checked), log, jobs, cancel: each a plain call returning the
    result; errors are TranscoderError, an unreachable server's a
    CannotConnect (also a ConnectError) naming the URL; the script exits 0 on
    its own (the reactor's thread stopped at exit).  A `with` block that
    raises closes the client too.
    """
    out = tmp_path / "out.mp4"
    proc = _python(_SCRIPT, server.url, str(clips.av), str(out))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    size = clips.av.stat().st_size
    assert report["health"] == "ok"
    assert {"mp4-h264", "mux-avi"} <= set(report["profiles"])
    assert report["sent"] == [size, size]
    assert report["filename"] == "renamed.mp4"
    assert report["state"] == "succeeded"
    assert report["digest_ok"] and out.stat().st_size > 0
    assert report["log"] and report["listed"]
    assert report["after_cancel"] == [404, "not_found"]
    kind, is_connect_error, url, text = report["unreachable"]
    assert (kind, is_connect_error, url) == ("CannotConnect", True, "http://127.0.0.1:9/health")
    assert text.startswith("cannot connect to http://127.0.0.1:9/health (GET): ")
    assert report["closed"] == 1
    assert "transcoder-reactor" in report["threads"]
    assert stderr == ""


_INTERRUPTED = """
import sys
from pathlib import Path
from transcoder.client import Blocking

with Blocking(sys.argv[1]) as client:
    job = client.submit(Path(sys.argv[2]), "mp4-h264", {"preset": "veryslow"})
    try:
        # Inside the try: the test's Ctrl-C may come before wait() is entered.
        print(job.id, flush=True)
        client.wait(job.id)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    # The reactor's thread still serves: the job goes on, and can be cancelled.
    print(client.get(job.id).state, flush=True)
    client.cancel(job.id)
    print("cancelled", flush=True)
"""


def test_ctrl_c_during_a_blocking_call(server: ServerProcess, clips: Any) -> None:
    """
    Ctrl-C (SIGINT) while Blocking.wait() blocks raises KeyboardInterrupt in
    the script at once; the client still works afterwards (get, cancel).
    """
    proc = _python(_INTERRUPTED, server.url, str(clips.av_long))
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    assert len(job_id) == 32
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    lines = stdout.split()
    assert lines[0] == "interrupted"
    assert lines[1] in ("queued", "running")
    assert lines[2] == "cancelled"


_INTERRUPTED_UPLOAD = """
import os, signal, sys
from pathlib import Path
from transcoder.client import Blocking

def progress(sent, total):
    # Ctrl-C a quarter of the way, as a user at the terminal would (this runs
    # in the reactor's thread; the signal goes to the main one).
    if sent >= total // 4 and not progress.sent:
        progress.sent = True
        os.kill(os.getpid(), signal.SIGINT)
progress.sent = False

with Blocking(sys.argv[1]) as client:
    try:
        client.submit(Path(sys.argv[2]), "mp4-h264", on_progress=progress)
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    # The test looks at the server while this process (and its reactor) lives on.
    sys.stdin.readline()
    print(len(list(client.jobs())), flush=True)
"""


def test_ctrl_c_during_a_blocking_upload(tmp_path: Path) -> None:
    """
    Ctrl-C (SIGINT) while Blocking.submit() uploads raises KeyboardInterrupt
    at once and drops the upload, as documented: the server makes no job of it
    and keeps nothing of it on disk; the client still works (jobs()).
    """
    big = random_file(tmp_path / "big.mp4", 256 << 20)
    server = serve(tmp_path / "data", tmp_path / "serve.log")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _INTERRUPTED_UPLOAD, server.url, str(big)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline() == "interrupted\n"
        # Dropped while the script lives: a finished upload would have become a job.
        assert wait_for(lambda: no_uploads_left(tmp_path / "data"), timeout=10)
        with urllib.request.urlopen(f"{server.url}/jobs") as answer:
            assert json.load(answer)["jobs"] == []
        stdout, stderr = proc.communicate("go on\n", timeout=60)
        assert proc.returncode == 0, stderr
        assert stdout.split() == ["0"]
    finally:
        server.stop()


_TWISTED_PROGRAM = """
from twisted.internet.task import deferLater, react
from transcoder.client import Blocking

def attempt():
    try:
        Blocking("http://127.0.0.1:9")
    except RuntimeError as e:
        print(e)

def main(reactor):
    # Once the reactor runs, as a Twisted program's code does.
    return deferLater(reactor, 0, attempt)

react(main)
"""


def test_blocking_refuses_a_running_reactor() -> None:
    """In a Twisted program (its reactor already running), Blocking says to use Client."""
    proc = _python(_TWISTED_PROGRAM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "use transcoder.client.Client" in stdout


def test_blocking_takes_the_clients_arguments() -> None:
    """Each of Blocking's calls takes the arguments of the Client method it runs, by the same names and defaults, as docs/client.md says (download's retries= among them)."""
    from transcoder.client import Blocking, Client

    names = ["submit", "get", "wait", "download", "download_outputs", "cancel", "jobs",
             "profiles", "log", "health", "close"]  # fmt: skip
    for name in names:
        ours = inspect.signature(getattr(Blocking, name)).parameters
        theirs = inspect.signature(getattr(Client, name)).parameters
        if name == "submit":
            # Client's keyword-only filename=, callback_url=, sha256= pass through **options.
            theirs = {k: p for k, p in theirs.items() if p.kind is not p.KEYWORD_ONLY}
            ours = {k: p for k, p in ours.items() if p.kind is not p.VAR_KEYWORD}
        shape = [(p.name, p.kind, p.default) for p in ours.values()]
        assert shape == [(p.name, p.kind, p.default) for p in theirs.values()], name

"""
What the server sets up at start-up, for its memory: the HTTP client stack
(treq, twisted.web.client) is imported only once a webhook is sent, and
glibc's malloc keeps one arena for all threads.

Each check runs in a fresh interpreter: this test process has long imported
everything, and its threads have their arenas.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# The modules the webhooks' HTTP client brings; none of them is needed to serve.
CLIENT_MODULES = ("treq", "twisted.web.client", "twisted.web._newclient")

_SERVE = """
import json, sys
from twisted.internet import reactor
from transcoder.cli import Options
from transcoder.service import makeService

options = Options()
options.parseOptions(
    ["serve", "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", sys.argv[1],
     "--webhook-secret", "s3cret"]
)
service = makeService(options.subOptions, reactor)

def stopped(_):
    reactor.stop()

def run():
    service.startService()
    reactor.callLater(0.2, lambda: service.stopService().addBoth(stopped))

reactor.callWhenRunning(run)
reactor.run()
print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))
"""

_SEND = """
import json, sys
from twisted.internet import reactor
from transcoder.core.jobs import InputFile, Job, JobState, new_job_id
from transcoder.http.webhooks import WebhookNotifier

class Registry:
    def __init__(self):
        self.subscribers = []

    def subscribe(self, callback):
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def get(self, job_id):
        return None

registry = Registry()
notifier = WebhookNotifier(reactor, registry, secret=None, max_attempts=1, timeout=5.0)
notifier.start()
before = sorted(m for m in sys.argv[2:] if m in sys.modules)
job = Job(
    id=new_job_id(), profile="p", params={},
    inputs=[InputFile("file", "clip.mov", 3, "00" * 32, "input/file.mov")],
    state=JobState.SUCCEEDED, created_at=1.0, started_at=2.0, finished_at=3.0,
    callback_url=sys.argv[1],
)

def check():
    if notifier.pending:
        reactor.callLater(0.05, check)
    else:
        reactor.stop()

def send():
    for callback in registry.subscribers:
        callback(job)
    check()

reactor.callWhenRunning(send)
reactor.run()
print(json.dumps([before, sorted(m for m in sys.argv[2:] if m in sys.modules)]))
"""


# Counts glibc's arenas after a thread allocated, with or without the service made first.
_ARENAS = """
import ctypes, os, sys, tempfile, threading
from twisted.internet import reactor
from transcoder.cli import Options
from transcoder.service import makeService

if sys.argv[1] == "service":
    options = Options()
    options.parseOptions(["serve", "--data-dir", sys.argv[2]])
    makeService(options.subOptions, reactor)

def allocate():
    # Blocks above pymalloc's 512 bytes come from malloc, in this thread's arena.
    keep = [bytearray(4096) for _ in range(1000)]
    del keep

thread = threading.Thread(target=allocate)
thread.start()
thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile() as out:
    stream = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(out.name).read().count("<heap nr="))
"""


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    root = Path(__file__).resolve().parent.parent
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        check=False,
        env={**environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serve_starts_and_stops_without_the_http_client(tmp_path: Path) -> None:
    """The service as `transcoder serve` builds it (webhooks configured) starts and stops without importing treq or twisted.web.client."""
    loaded = _run(_SERVE, str(tmp_path / "data"), *CLIENT_MODULES)
    assert loaded == []


def test_the_first_webhook_loads_the_http_client() -> None:
    """The notifier imports treq and twisted.web.client when it first sends, not when it is made or started."""
    # A port that was free a moment ago: the attempt fails fast, refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before, after = _run(_SEND, f"http://127.0.0.1:{port}/hook", *CLIENT_MODULES)
    assert before == []
    assert after == sorted(CLIENT_MODULES)


def test_the_service_keeps_one_malloc_arena(tmp_path: Path) -> None:
    """Once the service is made, a thread's allocations come from malloc's main arena; without it, from an arena of the thread's own."""
    assert _run(_ARENAS, "plain") == 2
    assert _run(_ARENAS, "service", str(tmp_path / "data")) == 1


def test_malloc_arena_max_in_the_environment_wins(tmp_path: Path) -> None:
    """With MALLOC_ARENA_MAX set, the service leaves malloc's arenas as the operator chose."""
    arenas = _run(_ARENAS, "service", str(tmp_path / "data"), env={"MALLOC_ARENA_MAX": "4"})
    assert arenas == 2

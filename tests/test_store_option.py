"""
C{--store}: which job database the service uses, parsed by the one Options
class; and C{transcoder serve --store postgresql://...} end to end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from serverproc import serve, transcoder
from twisted.internet import reactor
from twisted.python import usage

from transcoder.core.sqlite import SQLiteJobStore
from transcoder.core.stores import StoreURL, open_store
from transcoder.service import Options

if TYPE_CHECKING:
    from conftest import Clips


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_default_is_the_data_dirs_sqlite_file() -> None:
    """Without --store the service keeps today's SQLite file in the data dir."""
    assert parse()["store-url"] is None


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("sqlite:/var/lib/transcoder/jobs.db", StoreURL("sqlite", "/var/lib/transcoder/jobs.db")),
        ("sqlite:relative/jobs.db", StoreURL("sqlite", "relative/jobs.db")),
        ("postgresql://transcoder@db:5432/jobs", StoreURL("postgresql", "postgresql://transcoder@db:5432/jobs")),
        ("postgres://db/jobs?sslmode=require", StoreURL("postgresql", "postgres://db/jobs?sslmode=require")),
        ("postgresql://u:pw@h1:5432,h2:5433/jobs", StoreURL("postgresql", "postgresql://u:pw@h1:5432,h2:5433/jobs")),
        ("postgresql://[::1]:5432/jobs", StoreURL("postgresql", "postgresql://[::1]:5432/jobs")),
    ],
)  # fmt: skip
def test_store_urls(value: str, want: StoreURL) -> None:
    """sqlite:PATH and postgresql:// (or postgres://) URLs, libpq's multi-host form included, are taken as given."""
    assert parse("--store", value)["store-url"] == want


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mysql://u@h/db", "neither sqlite:PATH nor postgresql://"),
        ("/var/lib/jobs.sqlite3", "neither sqlite:PATH nor postgresql://"),
        ("sqlite:", "names no file"),
        ("postgresql:db", "neither sqlite:PATH nor postgresql://"),
        ("postgresql://u:s3cret@h:notaport/db", "'postgresql://u@h:notaport/db': port 'notaport'"),
        ("postgresql://u@[::1]:99999/db", "port '99999'"),
        ("postgresql://u:s3cret@h/db?nosuchparam=1", "nosuchparam"),
    ],
)
def test_bad_store_urls_are_usage_errors(value: str, message: str) -> None:
    """A --store value that names no store is a usage error that quotes it, never with its password."""
    with pytest.raises(usage.UsageError) as e:
        parse("--store", value)
    assert str(e.value).startswith("--store: ")
    assert message in str(e.value)
    assert "s3cret" not in str(e.value)


def test_store_url_shows_no_password() -> None:
    """A store URL printed in logs has no password."""
    url = parse("--store", "postgresql://u:s3cret@h:5432/db")["store-url"]
    assert str(url) == "postgresql://u@h:5432/db"
    assert str(StoreURL("sqlite", "/x/jobs.db")) == "sqlite:/x/jobs.db"


@pytest_twisted.ensureDeferred
async def test_sqlite_store_where_asked(tmp_path: Path) -> None:
    """sqlite:PATH opens the SQLite store at PATH, its directories made."""
    path = tmp_path / "elsewhere" / "jobs.db"
    store = open_store(StoreURL("sqlite", str(path)), reactor)
    assert isinstance(store, SQLiteJobStore)
    assert store.path == path and path.is_file()
    await store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_serve_with_an_unreachable_database_exits_1(tmp_path: Path) -> None:
    """`transcoder serve --store` on a database nobody listens for exits 1 at once, naming the database without its password, and never listens."""
    url = f"postgresql://transcoder:s3cret@127.0.0.1:{_closed_port()}/jobs"
    result = subprocess.run(
        [transcoder(), "serve", "--listen", "tcp:0:interface=127.0.0.1",
         "--data-dir", str(tmp_path / "data"), "--store", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    # serve's log takes over stderr once it starts, so the message may be on stdout.
    output = result.stdout + result.stderr
    assert "transcoder: cannot start: job database postgresql://transcoder@127.0.0.1:" in output
    assert "s3cret" not in result.stdout + result.stderr
    assert "starting on" not in result.stdout


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_serve_on_postgresql_keeps_jobs_across_a_restart(
    tmp_path: Path, clips: Clips, pg_dsn: str, ffprobe_json: Any
) -> None:
    """`transcoder serve --store postgresql://...` takes a real mux-avi upload and runs it to success; a server restarted on the same database lists the job as succeeded and serves its result; no SQLite file is made."""
    data = tmp_path / "data"
    server = serve(data, tmp_path / "first.log", "--store", pg_dsn, "--workers", "1")
    try:
        assert f"jobs in {pg_dsn}" in server.output
        r = subprocess.run(
            ["curl", "-sS", "-F", "profile=mux-avi", "-F", f"video=@{clips.flv_video}",
             "-F", f"audio=@{clips.mp3_audio}", f"{server.url}/jobs"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        job_id = json.loads(r.stdout)["id"]
        deadline = time.monotonic() + 60
        job = _get(f"{server.url}/jobs/{job_id}")
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            job = _get(f"{server.url}/jobs/{job_id}?wait=10")
        assert job["state"] == "succeeded", job
    finally:
        server.stop()

    again = serve(data, tmp_path / "second.log", "--store", pg_dsn, "--workers", "1")
    try:
        listed = _get(f"{again.url}/jobs?state=succeeded")["jobs"]
        assert [j["id"] for j in listed] == [job_id]
        assert _get(f"{again.url}/jobs/{job_id}") == job
        out = tmp_path / "out.avi"
        subprocess.run(
            ["curl", "-sSf", "-o", str(out), f"{again.url}/jobs/{job_id}/result"],
            timeout=60, check=True,
        )  # fmt: skip
        codecs = sorted(s["codec_name"] for s in ffprobe_json(out)["streams"])
        assert codecs == ["flv1", "mp3"]
    finally:
        again.stop()
    assert not list(data.glob("jobs.sqlite3*"))


_WITHOUT_PSYCOPG = """
import sys
# As on an install without the postgres extra: importing psycopg fails.
sys.modules["psycopg"] = None
sys.modules["psycopg_pool"] = None
import pkgutil, importlib, transcoder.core, transcoder.service
for m in pkgutil.iter_modules(transcoder.core.__path__):
    importlib.import_module("transcoder.core." + m.name)
from twisted.python import usage
from transcoder.service import Options
Options().parseOptions(["--store", "sqlite:/tmp/x.db"])
try:
    Options().parseOptions(["--store", "postgresql://u@h/db"])
except usage.UsageError as e:
    print(e)
"""


def test_without_the_postgres_extra(tmp_path: Path) -> None:
    """Without psycopg every core module and the service import, SQLite works, and --store postgresql:// is a usage error that names the extra to install."""
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PSYCOPG],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pip install 'transcoder[postgres]'" in result.stdout

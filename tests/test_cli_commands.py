"""
The C{transcoder} command's newer parts, run as the real command against a
real server: global options before the command, C{profiles}, C{log},
C{download} under the server's name, the C{jobs} table, and a reader that
goes away (C{| head}).  The cursor-following of C{jobs --all} is checked in
memory, against a server that gives two jobs a page, and against a real
server one job a page.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import parse_qs, quote, urlsplit
from urllib.request import Request as URLRequest
from urllib.request import urlopen

import pytest
import pytest_twisted
from serverproc import ServerProcess, serve, transcoder, wait_for
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request

from transcoder.client import Client, TranscoderError, cli_commands
from transcoder.client.cli import EXIT_LOCAL_FILE, EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, Options
from transcoder.client.cli_commands import run_command


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("cli-commands-server")
    proc = serve(d / "data", d / "serve.log")
    yield proc
    proc.stop()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}


def _run(*args: str, cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [transcoder(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def _submit(server: ServerProcess, path: Path, *extra: str) -> str:
    done = _run("-s", server.url, "-q", "submit", str(path), "-p", "mp4-h264", *extra)
    assert done.returncode == EXIT_OK, done.stderr
    return done.stdout.strip()


def test_global_options_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    --server, --token, --quiet, --cacert and --insecure may come before the
    command's name; given again after it, the later one wins.
    """
    monkeypatch.delenv("TRANSCODER_URL", raising=False)
    options = Options()
    options.parseOptions(["-s", "http://a:1", "-t", "tok", "-q", "-k", "jobs", "--all"])
    sub = options.subOptions
    assert (sub["server"], sub["token"], sub["quiet"], sub["insecure"], sub["all"]) == (
        "http://a:1", "tok", True, True, True,
    )  # fmt: skip
    options = Options()
    options.parseOptions(["--server", "http://a:1", "status", "ID", "--server", "http://b:2"])
    assert options.subOptions["server"] == "http://b:2"


def test_global_server_option_end_to_end(server: ServerProcess, clips: Any) -> None:
    """`transcoder -s URL jobs` talks to URL (once: "option -s not recognized")."""
    job_id = _submit(server, clips.av, "--param", "preset=ultrafast")
    listed = _run("-s", server.url, "jobs")
    assert listed.returncode == EXIT_OK, listed.stderr
    assert job_id in listed.stdout
    assert _run("-s", server.url, "-q", "wait", job_id).returncode == EXIT_OK


def test_profiles_shows_each_parameter(server: ServerProcess) -> None:
    """
    `transcoder profiles` lists every profile of the server with its inputs,
    outputs and each parameter's type, default and range; --json is the
    server's list as it is.
    """
    with urlopen(server.url + "/profiles") as answer:
        offered = json.load(answer)["profiles"]
    shown = _run("-s", server.url, "profiles")
    assert shown.returncode == EXIT_OK, shown.stderr
    text = shown.stdout
    for profile in offered:
        assert f"\n{profile['name']}: " in "\n" + text
    crf = next(line for line in text.splitlines() if line.split()[:1] == ["crf"])
    assert crf.split()[:4] == ["crf", "int", "23", "0..51"]
    preset = next(line for line in text.splitlines() if line.split()[:1] == ["preset"])
    assert "ultrafast|superfast" in preset
    as_json = _run("-s", server.url, "profiles", "--json")
    assert json.loads(as_json.stdout) == offered


def test_log_prints_the_encoder_log(server: ServerProcess, clips: Any) -> None:
    """`transcoder log ID` prints the job's encoder log as the server has it; --tail N its end."""
    job_id = _submit(server, clips.av, "--param", "preset=ultrafast", "--wait")
    with urlopen(f"{server.url}/jobs/{job_id}/log") as answer:
        whole = answer.read().decode()
    with urlopen(f"{server.url}/jobs/{job_id}/log?tail=3") as answer:
        tail = answer.read().decode()
    printed = _run("-s", server.url, "log", job_id)
    assert printed.returncode == EXIT_OK, printed.stderr
    assert printed.stdout == whole and whole.strip()
    assert _run("-s", server.url, "log", job_id, "--tail", "3").stdout == tail
    assert len(tail.splitlines()) == 3


def test_download_without_o_uses_the_servers_name(
    server: ServerProcess, clips: Any, tmp_path: Path
) -> None:
    """
    `transcoder download ID` saves the result in the current directory under
    the name the server suggests (the input's, with the output's extension),
    says so, and refuses to overwrite a file of that name (exit 2, file kept).
    A job not finished yet is a server error saying its state, nothing saved.
    """
    clip = tmp_path / "my clip.mov"
    shutil.copy(clips.av, clip)
    job_id = _submit(server, clip, "--param", "preset=ultrafast", "--wait")
    where = tmp_path / "here"
    where.mkdir()
    saved = _run("-s", server.url, "download", job_id, cwd=where)
    assert saved.returncode == EXIT_OK, saved.stderr
    assert "transcoder: saving the result as my clip.mp4" in saved.stderr
    assert os.listdir(where) == ["my clip.mp4"]
    with urlopen(f"{server.url}/jobs/{job_id}") as answer:
        expected = json.load(answer)["output"]["sha256"]
    data = (where / "my clip.mp4").read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected
    again = _run("-s", server.url, "download", job_id, cwd=where)
    assert again.returncode == EXIT_USAGE
    assert "my clip.mp4 exists; not overwriting it" in again.stderr
    assert (where / "my clip.mp4").read_bytes() == data
    assert os.listdir(where) == ["my clip.mp4"]
    slow = _submit(server, clips.av_long, "--param", "preset=veryslow")
    early = _run("-s", server.url, "download", slow, cwd=where)
    _run("-s", server.url, "cancel", slow)
    assert early.returncode == EXIT_SERVER_ERROR
    assert "409: not_ready: the job is" in early.stderr
    assert os.listdir(where) == ["my clip.mp4"]


def test_download_without_o_fits_a_long_suggested_name(
    server: ServerProcess, clips: Any, tmp_path: Path
) -> None:
    """
    A suggested name longer than a file name may be (120 CJK letters: 352
    bytes in UTF-8) is cut at its start, so that it and the download's
    C{.part} both fit in 255 bytes: the result is saved, its extension kept.
    """
    name = "動" * 116 + ".mov"
    upload = URLRequest(
        f"{server.url}/jobs?profile=mp4-h264&preset=ultrafast&filename={quote(name)}",
        data=clips.av.read_bytes(),
        method="PUT",
    )
    with urlopen(upload, timeout=60) as answer:
        job_id = json.load(answer)["id"]
    assert _run("-s", server.url, "-q", "wait", job_id).returncode == EXIT_OK
    where = tmp_path / "here"
    where.mkdir()
    saved = _run("-s", server.url, "-q", "download", job_id, cwd=where)
    assert saved.returncode == EXIT_OK, saved.stderr
    assert os.listdir(where) == ["動" * 82 + ".mp4"]


def test_jobs_table_limit_and_json(tmp_path: Path, clips: Any) -> None:
    """
    `transcoder jobs` prints a header and one aligned row per job (id, state,
    progress, profile, file, created), newest first; --limit N shows N and
    says there are more; --json prints the jobs as JSON.
    """
    server = serve(tmp_path / "data", tmp_path / "serve.log")
    try:
        names = ["first.mp4", "second.mp4", "third.mp4"]
        ids = []
        for name in names:
            clip = tmp_path / name
            shutil.copy(clips.av, clip)
            ids.append(_submit(server, clip, "--param", "preset=ultrafast", "--wait"))
        table = _run("-s", server.url, "jobs")
        limited = _run("-s", server.url, "jobs", "--limit", "2")
        as_json = _run("-s", server.url, "jobs", "--json")
        everything = _run("-s", server.url, "jobs", "--all")
    finally:
        server.stop()
    assert table.returncode == EXIT_OK, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "PROGRESS", "PROFILE", "FILE", "CREATED"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ids[::-1]
    for row, name in zip(rows, names[::-1], strict=True):
        assert row[1:5] == ["succeeded", "100%", "mp4-h264", name]
        assert len(row[5]) == 10 and len(row[6]) == 8  # 2026-12-07 16:03:37
    # Aligned: every row's STATE starts where the header's does.
    column = lines[0].index("STATE")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines)
    assert [line.split()[0] for line in limited.stdout.splitlines()[1:]] == ids[:0:-1]
    assert "--all" in limited.stderr
    assert [j["id"] for j in json.loads(as_json.stdout)] == ids[::-1]
    assert everything.stdout == table.stdout


class _Pages(Resource):
    """C{GET /jobs} of C{count} jobs, two a page whatever the limit."""

    isLeaf = True

    def __init__(self, count: int) -> None:
        super().__init__()
        self.jobs = [
            {"id": f"{n:032d}", "profile": "p", "state": "queued", "progress": 0,
             "inputs": [{"filename": f"f{n}.mp4"}], "created_at": "2026-12-07T16:00:00.000Z"}
            for n in range(count)
        ]  # fmt: skip
        self.asked: list[dict[str, list[str]]] = []

    def render_GET(self, request: Request) -> bytes:
        query = parse_qs(urlsplit(request.uri.decode()).query)
        self.asked.append(query)
        start = int(query.get("cursor", ["0"])[0])
        following = str(start + 2) if start + 2 < len(self.jobs) else None
        return json.dumps({"jobs": self.jobs[start : start + 2], "next": following}).encode()


async def _jobs(pages: _Pages, *args: str) -> tuple[int, str, str]:
    options = Options()
    options.parseOptions(["-s", "http://h", "jobs", *args])
    out, err = io.StringIO(), io.StringIO()
    client = Client("http://h", http=StubTreq(pages))
    code = await run_command(reactor, "jobs", options.subOptions, out, err, client=client)
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_jobs_all_and_limit_follow_the_cursor() -> None:
    """
    --all follows the server's `next` to the last page; --limit N follows it
    until N jobs, asking no more than it still needs; without either, 50.
    """
    pages = _Pages(5)
    code, out, _ = await _jobs(pages, "--all")
    assert code == EXIT_OK
    assert [line.split()[0] for line in out.splitlines()[1:]] == [j["id"] for j in pages.jobs]
    assert [q.get("cursor") for q in pages.asked] == [None, ["2"], ["4"]]
    pages = _Pages(5)
    code, out, err = await _jobs(pages, "--limit", "3")
    assert len(out.splitlines()) == 4
    assert [q["limit"] for q in pages.asked] == [["3"], ["1"]]
    assert "newest 3 shown; --all lists every job" in err
    pages = _Pages(3)
    code, out, err = await _jobs(pages)
    assert pages.asked[0]["limit"] == ["50"] and len(out.splitlines()) == 4 and err == ""


@pytest_twisted.ensureDeferred
async def test_jobs_all_pages_through_a_real_server(
    tmp_path: Path, clips: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    `jobs --all` against a real server, one job a page (the smallest page the
    API takes): four pages for four jobs, every job once, newest first, the same
    table as the server's one page of them all; a job uploaded between two
    pages (newer than the cursor) neither shifts the pages nor shows.
    """
    monkeypatch.setattr(cli_commands, "PAGE_SIZE", 1)
    real = serve(tmp_path / "data", tmp_path / "serve.log", "--workers", "0")
    try:
        ids = [_submit(real, clips.av) for _ in range(4)]
        whole = _run("-s", real.url, "jobs", "--limit", "500")
        client = Client(real.url, reactor=reactor)
        asked: list[tuple[int | None, str | None]] = []
        late: list[str] = []
        page = client.page

        def spy(state: str | None, limit: int | None = None, cursor: str | None = None) -> Any:
            asked.append((limit, cursor))
            if len(asked) == 2:
                late.append(_submit(real, clips.av))
            return page(state, limit, cursor)

        client.page = spy  # type: ignore[method-assign]
        options = Options()
        options.parseOptions(["-s", real.url, "jobs", "--all"])
        out, err = io.StringIO(), io.StringIO()
        try:
            code = await run_command(reactor, "jobs", options.subOptions, out, err, client=client)
        finally:
            await client.close()
    finally:
        real.stop()
    assert (code, err.getvalue()) == (EXIT_OK, "")
    assert [limit for limit, _ in asked] == [1] * 4
    assert asked[0][1] is None and all(cursor for _, cursor in asked[1:])
    rows = [line.split()[0] for line in out.getvalue().splitlines()[1:]]
    assert rows == ids[::-1] and late[0] not in rows
    assert out.getvalue() == whole.stdout


@pytest_twisted.ensureDeferred
async def test_an_expired_job_says_so(tmp_path: Path, clips: Any) -> None:
    """
    Once retention removed a job (--keep-results 1s), `status`, `wait` and
    `download` exit 3 saying it expired under --keep-results (download leaves
    no file), and the Python client's get() raises TranscoderError 410 expired,
    as docs/client.md says.
    """
    real = serve(tmp_path / "data", tmp_path / "serve.log", "--keep-results", "1s")
    try:
        job_id = _submit(real, clips.mp3_audio, "-p", "audio-mp3", "--wait")

        def gone() -> bool:
            try:
                urlopen(f"{real.url}/jobs/{job_id}").close()
            except HTTPError as e:
                return e.code == 410
            return False

        assert wait_for(gone, timeout=60)
        where = tmp_path / "here"
        where.mkdir()
        done = {
            command: _run("-s", real.url, command, job_id, *extra, cwd=where)
            for command, extra in [("status", ()), ("wait", ()), ("download", ("-o", "x.mp3"))]
        }
        async with Client(real.url) as client:
            with pytest.raises(TranscoderError) as raised:
                await client.get(job_id)
    finally:
        real.stop()
    for command, result in done.items():
        assert result.returncode == EXIT_SERVER_ERROR, command
        assert result.stderr.startswith(
            f"transcoder: server error 410: expired: job {job_id} expired: "
        )
        assert result.stderr.rstrip().endswith("(--keep-results); run it again"), result.stderr
    assert os.listdir(where) == []
    assert (raised.value.status, raised.value.code) == (410, "expired")


def test_jobs_into_a_closed_pipe_exits_0_quietly(server: ServerProcess) -> None:
    """
    `transcoder jobs` whose stdout's reader has gone (its end closed before
    anything is written, as `| head` does once it has its lines) exits 0
    with nothing on stderr: no "Broken pipe", no exit 2.
    """
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [transcoder(), "-s", server.url, "jobs", "--all"],
            stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, timeout=60, env=_env(),
        )  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (EXIT_OK, "")


def test_jobs_piped_into_head(server: ServerProcess, clips: Any) -> None:
    """`transcoder jobs | head -n 1` under `set -o pipefail`: the header, and status 0."""
    _submit(server, clips.av, "--param", "preset=ultrafast", "--wait")
    done = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" -s "$1" jobs --all | head -n 1', transcoder(), server.url],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == ["ID", "STATE", "PROGRESS", "PROFILE", "FILE", "CREATED"]


@pytest_twisted.ensureDeferred
async def test_download_without_o_keeps_a_file_made_while_it_ran(
    server: ServerProcess, clips: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    `transcoder download ID` never overwrites: a file of the suggested name
    made after the up-front check, while the result downloads, is kept, the
    command says so as the check does (exit 2), and no .part is left.
    """
    clip = tmp_path / "raced.mov"
    shutil.copy(clips.av, clip)
    job_id = _submit(server, clip, "--param", "preset=ultrafast", "--wait")
    where = tmp_path / "here"
    where.mkdir()
    monkeypatch.chdir(where)
    client = Client(server.url, reactor=reactor)
    fetch = client.fetch

    async def meanwhile(result: str, expected: str | None, path: Path, *rest: Any) -> Path:
        # After the command's check, before the bytes arrive: as another program would.
        path.write_bytes(b"someone else's")
        return await fetch(result, expected, path, *rest)

    client.fetch = meanwhile  # type: ignore[method-assign,assignment]
    options = Options()
    options.parseOptions(["-s", server.url, "download", job_id])
    out, err = io.StringIO(), io.StringIO()
    try:
        code = await run_command(reactor, "download", options.subOptions, out, err, client=client)
    finally:
        await client.close()
    assert code == EXIT_USAGE
    assert "raced.mp4 exists; not overwriting it (name another file with -o)" in err.getvalue()
    assert os.listdir(where) == ["raced.mp4"]
    assert (where / "raced.mp4").read_bytes() == b"someone else's"


def test_a_local_file_error_has_its_own_exit_code(
    server: ServerProcess, clips: Any, tmp_path: Path
) -> None:
    """
    A result that cannot be saved (-o names a path under a file) is a local
    file error: its reason on stderr and exit 74, not 2 (bad usage); no
    traceback.
    """
    job_id = _submit(server, clips.av, "--param", "preset=ultrafast", "--wait")
    blocker = tmp_path / "somefile"
    blocker.write_bytes(b"not a directory")
    saved = _run("-s", server.url, "-q", "download", job_id, "-o", str(blocker / "x.mp4"))
    assert saved.returncode == EXIT_LOCAL_FILE == 74
    assert "Not a directory" in saved.stderr
    assert "Traceback" not in saved.stderr
    assert blocker.read_bytes() == b"not a directory"

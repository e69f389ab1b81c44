"""
The doc check: every ```sh block of README.md, docs/api.md, docs/client.md and
docs/deployment.md runs as written, in order, in one bash per doc (C{set -euo pipefail}:
any command that fails fails the doc), in a temporary directory, against a real
server (C{transcoder serve} on a loopback port).

What the test changes, and nothing else: C{http://127.0.0.1:8080} becomes the test
server's URL (C{TRANSCODER_URL} too, for the CLI's default); the directory has a
C{.venv} that is the tests' virtualenv, which is also first on C{PATH} (for a bare
C{transcoder} or C{twistd}); the clips a doc says another doc made are made first,
under the names the docs use.  Blocks marked C{<!-- not run: REASON -->} are left
out (docblocks.py describes the convention).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from docblocks import DOCS, OTHER_SHELL_LABELS, Block, blocks
from serverproc import BIN, REPO, ServerProcess, serve

DOC_URL = "http://127.0.0.1:8080"

# The files a doc relies on without making them: made as the README makes them, shorter.
_CLIPS = {
    "clip.mp4": "-f lavfi -i testsrc=duration=2:size=320x240:rate=25 -f lavfi -i sine=duration=2 "
    "-c:v libx264 -pix_fmt yuv420p -c:a aac",
    "clip.mov": "-f lavfi -i testsrc=duration=2:size=320x240:rate=25 -f lavfi -i sine=duration=2 "
    "-c:v libx264 -pix_fmt yuv420p -c:a aac",
    "video.flv": "-f lavfi -i testsrc=duration=2:size=320x240:rate=25 -an -c:v flv1",
    "audio.mp3": "-f lavfi -i sine=duration=2 -c:a libmp3lame",
}
PREREQUISITES: dict[str, tuple[str, ...]] = {
    # "after the README's quick start made clip.mp4, video.flv and audio.mp3 there"; and
    # its "make this 720p" example names a clip.mov, which api.md makes.
    "docs/client.md": ("clip.mp4", "clip.mov", "video.flv", "audio.mp3"),
}


def _all_blocks(doc: str) -> list[Block]:
    return blocks(REPO / doc, doc)


def _script(doc: str, url: str) -> str:
    lines = ["set -euo pipefail", "doc_block=none"]
    lines.append(
        f"trap 'echo \"doc check: a command failed in the block at {doc}:$doc_block\" >&2' ERR"
    )
    for block in _all_blocks(doc):
        if block.label != "sh" or block.not_run is not None:
            continue
        lines.append(f"doc_block={block.line}")
        lines.append(block.text.replace(DOC_URL, url))
    return "\n".join(lines) + "\n"


def _make_clip(work: Path, name: str) -> None:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", *_CLIPS[name].split(), str(work / name)],
        check=True, timeout=60,
    )  # fmt: skip


def _run_doc(
    doc: str, tmp_path: Path
) -> tuple[ServerProcess, Path, subprocess.CompletedProcess[str]]:
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(BIN.parent)
    for name in PREREQUISITES.get(doc, ()):
        _make_clip(work, name)
    server = serve(tmp_path / "data", tmp_path / "server.log", "--workers", "2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", TRANSCODER_URL=server.url)
    script = work / "doc.sh"
    script.write_text(_script(doc, server.url))
    try:
        result = subprocess.run(
            ["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    except BaseException:
        server.stop()
        raise
    return server, work, result


def _check(server: ServerProcess, work: Path, result: subprocess.CompletedProcess[str]) -> None:
    server.stop()
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        f"\n--- server\n{server.output[-4000:]}"
    )
    # Followed in the checkout, the examples leave these files there: git must ignore them.
    left = sorted(
        p.name + "/" if p.is_dir() else p.name
        for p in work.iterdir()
        if p.name not in ("doc.sh", ".venv")
    )
    assert left == sorted(set(left) & _ignored(left)), f"not in .gitignore: {left}"


def _ignored(names: list[str]) -> set[str]:
    """Those of C{names}, at the checkout's root, that its .gitignore ignores."""
    if not names:
        return set()
    found = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", "--", *names],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return set(found.stdout.split())


def _media(path: Path) -> dict[str, object]:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    found: dict[str, object] = json.loads(probe.stdout)
    return found


def test_every_shell_block_is_sh_and_every_skip_says_why() -> None:
    """Every shell block of the four docs is labelled sh (so the check sees it), and each block left out of the check has a marker with a reason, right before an sh block."""
    for doc in DOCS:
        for block in _all_blocks(doc):
            assert block.label not in OTHER_SHELL_LABELS, f"{doc}:{block.line} is ```{block.label}"
            if block.not_run is not None:
                assert block.label == "sh", (
                    f"{doc}:{block.line}: a not-run marker on a non-sh block"
                )
                assert len(block.not_run) >= 10, f"{doc}:{block.line}: say why it is not run"
    runnable = [b for doc in DOCS for b in _all_blocks(doc) if b.label == "sh" and not b.not_run]
    assert len(runnable) > 20


# Every block the check leaves out, by its doc and first line: a new one is a choice made
# here, in review, not a marker slipped into a doc.  Where else each is checked, if anywhere.
_LEFT_OUT = {
    # Serve in the foreground: the check's own server stands in; `make test` is the suite.
    ("README.md", "make run     # installs what it needs, then serves on http://127.0.0.1:8080 with data in ./data"),
    ("README.md", "make run LISTEN=tcp:8081:interface=127.0.0.1 DATA_DIR=/tmp/transcoder-data"),
    # Writes /etc as root.
    ("README.md", "install -d -m 700 /etc/transcoder"),
    # Opens a window.
    ("docs/api.md", "ffplay http://127.0.0.1:8080/jobs/$HLS/outputs/master.m3u8"),
    # Root on the machine (test_deployment_docs.py: what pip install ships).
    ("docs/deployment.md", "apt-get install --no-install-recommends mencoder ffmpeg python3-venv"),
    # Foreground servers (test_twistd.py, test_deployment_docs.py run them, on loopback).
    ("docs/deployment.md", "twistd -n transcoder --listen tcp:8080:interface=127.0.0.1 --data-dir /var/lib/transcoder"),
    ("docs/deployment.md", "TRANSCODER_LISTEN=tcp:8080:interface=127.0.0.1 TRANSCODER_DATA_DIR=/var/lib/transcoder \\"),
    ("docs/deployment.md", "TRANSCODER_DATA_DIR=/var/lib/transcoder \\"),
    # Another machine: the database host, and a node of a cluster.
    ("docs/deployment.md", "# on the database host, as postgres"),
    ("docs/deployment.md", "pip install '.[postgres]'            # or: pip install 'transcoder[postgres]'"),
}  # fmt: skip


def test_the_blocks_left_out_are_few_and_known() -> None:
    """The sh blocks the doc check does not run are exactly the ten listed here (foreground servers, root, a window, other machines): a new section's block is run unless this list is changed too."""
    left_out = {
        (doc, b.text.splitlines()[0])
        for doc in DOCS
        for b in _all_blocks(doc)
        if b.not_run is not None
    }
    assert left_out == _LEFT_OUT


def test_readme_blocks_run(tmp_path: Path) -> None:
    """The README's shell blocks, pasted in order, transcode the clip, wait for it and save the video itself under out/ (not an error body), and the seed job and the CLI examples work."""
    server, work, result = _run_doc("README.md", tmp_path)
    _check(server, work, result)
    saved = sorted(p.name for p in (work / "out").iterdir())
    assert saved == ["clip.mp4"], saved
    media = _media(work / "out" / "clip.mp4")
    assert {s["codec_type"] for s in media["streams"]} == {"video", "audio"}  # type: ignore[attr-defined,index]
    assert "succeeded" in result.stdout


def test_api_blocks_run(tmp_path: Path) -> None:
    """docs/api.md's shell blocks run in order in one shell against `make run`'s stand-in, as its introduction promises."""
    server, work, result = _run_doc("docs/api.md", tmp_path)
    _check(server, work, result)
    assert _media(work / "clip.mp4")["streams"]


def test_client_blocks_run(tmp_path: Path) -> None:
    """docs/client.md's shell blocks (the CLI) run in order, from a directory holding the README's clips, and leave the files they name."""
    server, work, result = _run_doc("docs/client.md", tmp_path)
    _check(server, work, result)
    assert _media(work / "out.avi")["streams"]


def test_deployment_blocks_run(tmp_path: Path) -> None:
    """docs/deployment.md's shell blocks that can run here (those that need root, systemd or another machine say so) run as written."""
    server, work, result = _run_doc("docs/deployment.md", tmp_path)
    _check(server, work, result)


def test_readme_download_of_a_failed_job_saves_nothing(tmp_path: Path) -> None:
    """The README's download line, run for a job that failed, exits 22 and leaves out/ empty: the 409 error is not saved, under the video's name or any other."""
    (quick,) = [b for b in _all_blocks("README.md") if "-OJ" in b.text and b.not_run is None]
    (download,) = [line for line in quick.text.splitlines() if "-OJ" in line]
    work = tmp_path / "work"
    work.mkdir()
    _make_clip(work, "video.flv")
    server = serve(tmp_path / "data", tmp_path / "server.log")
    try:
        # A video without audio, for a profile that needs audio: the job fails.
        up = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "-T", "video.flv",
             f"{server.url}/jobs?profile=audio-mp3&filename=video.flv"],
            cwd=work, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        job_id = json.loads(up.stdout)["id"]
        for _ in range(60):
            with urllib.request.urlopen(f"{server.url}/jobs/{job_id}?wait=30") as r:
                state = json.load(r)["state"]
            if state not in ("queued", "running"):
                break
        assert state == "failed"
        result = subprocess.run(
            ["bash", "-c", download.replace(DOC_URL, server.url)],
            cwd=work, env={**os.environ, "id": job_id}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 22, result.stderr
    assert "409" in result.stderr
    assert list((work / "out").iterdir()) == []


def test_files_the_docs_and_twistd_leave_are_ignored_and_not_linted(tmp_path: Path) -> None:
    """twistd's pid and log files are in .gitignore, and a mux.py saved in the checkout's root as docs/client.md says (here with the example's code and an unused import on top) is left out by ruff check and ruff format, as `make lint` runs them: ruff follows .gitignore."""
    assert _ignored(["twistd.pid", "twistd.log", "mux.py"]) == {
        "twistd.pid",
        "twistd.log",
        "mux.py",
    }
    example = _python_blocks()[0]
    assert "mux.py" in (REPO / "docs" / "client.md").read_text()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in (".gitignore", "pyproject.toml"):
        shutil.copy(REPO / name, checkout / name)
    (checkout / "mux.py").write_text("import os\n" + example.text + "\n\n\n")
    (checkout / "kept.py").write_text('"""A module ruff does check."""\n')
    subprocess.run(["git", "init", "-q", str(checkout)], check=True, timeout=30)
    ruff = str(BIN / "ruff")
    for argv in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(argv, cwd=checkout, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    # The control: ruff does read kept.py, and would fail mux.py were it not ignored.
    listed = subprocess.run(
        [ruff, "check", "--show-files", "."], cwd=checkout, capture_output=True, text=True, timeout=60
    )  # fmt: skip
    assert "kept.py" in listed.stdout and "mux.py" not in listed.stdout, listed.stdout
    direct = subprocess.run(
        [ruff, "check", "--no-cache", "mux.py"], cwd=checkout, capture_output=True, text=True, timeout=60
    )  # fmt: skip
    assert direct.returncode == 1, direct.stdout


def _python_blocks() -> list[Block]:
    blocks = [b for b in _all_blocks("docs/client.md") if b.label == "python"]
    assert blocks, "docs/client.md has no Python example"
    return blocks


@pytest.mark.parametrize("which", [0, 1], ids=["blocking", "twisted"])
def test_client_python_example_runs(tmp_path: Path, which: int) -> None:
    """Each of docs/client.md's Python examples (the blocking one and the Twisted one), saved as mux.py next to the README's video.flv and audio.mp3 as the doc says, runs with .venv/bin/python mux.py against a real server and leaves out.avi, a video with both streams."""
    blocks = _python_blocks()
    assert len(blocks) == 2
    example = blocks[which]
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(BIN.parent)
    for name in ("video.flv", "audio.mp3"):
        _make_clip(work, name)
    server = serve(tmp_path / "data", tmp_path / "server.log")
    (work / "mux.py").write_text(example.text.replace(DOC_URL, server.url))
    try:
        result = subprocess.run(
            [str(work / ".venv" / "bin" / "python"), "mux.py"],
            cwd=work, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    streams = _media(work / "out.avi")["streams"]
    assert {s["codec_type"] for s in streams} == {"video", "audio"}  # type: ignore[attr-defined]
    assert _ignored(["mux.py", "out.avi"]) == {"mux.py", "out.avi"}

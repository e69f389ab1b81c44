"""
The configuration that docs/deployment.md gives for several nodes is checked
by the tools that will read it: nginx's block by C{nginx -t}, the systemd
template unit by C{systemd-analyze verify}.  C{make test} installs nginx
(test-sysdeps); systemd-analyze comes with systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from serverproc import BIN, REPO

DOC = REPO / "docs" / "deployment.md"


def _block(heading: str, language: str) -> str:
    """The first C{language} code block under C{heading} in docs/deployment.md."""
    text = DOC.read_text()
    start = text.index(f"\n{heading}\n")
    found = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert found is not None, f"no {language} block under {heading!r}"
    return found.group(1)


def test_nginx_block_for_several_nodes_passes_nginx_t(tmp_path: Path) -> None:
    """The nginx block of "nginx in front of the nodes" (upstream of the nodes, uploads unbuffered, a read timeout above the 60 s long-poll) is accepted by `nginx -t` inside an http block, in a prefix of its own."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed: `make test` installs it")
    snippet = _block("### nginx in front of the nodes", "nginx")
    timeout = re.search(r"proxy_read_timeout (\d+)s;", snippet)
    assert timeout is not None and int(timeout.group(1)) > 60, snippet
    assert "proxy_request_buffering off;" in snippet
    assert "client_max_body_size" in snippet
    (tmp_path / "snippet.conf").write_text(snippet)
    temp = {name: tmp_path / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\n"
        "events {}\n"
        "http {\n"
        f"    access_log {tmp_path}/access.log;\n"
        + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
        + f"    include {tmp_path}/snippet.conf;\n"
        "}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_systemd_template_unit_passes_verify(tmp_path: Path) -> None:
    """The template unit transcoder@.service of "One systemd unit per node" passes `systemd-analyze verify` as an instance (with its twistd path pointed at this venv's, since /opt is not installed here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (systemd)")
    unit = _block("### One systemd unit per node", "ini")
    assert "--node-name %i" in unit
    twistd = BIN / "twistd"
    unit = unit.replace("/opt/transcoder/venv/bin/twistd", str(twistd))
    (tmp_path / "transcoder@.service").write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "transcoder@enc-1.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "transcoder@" not in result.stdout + result.stderr, result.stdout + result.stderr

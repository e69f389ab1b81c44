"""
The configuration that docs/deployment.md gives is checked by the tools that
will read it: nginx's blocks by C{nginx -t}, the systemd units by
C{systemd-analyze verify}.  C{make test} installs nginx (test-sysdeps);
systemd-analyze comes with systemd.  The command lines that serve in the
foreground (not run by the doc check) are started here, and what the guide
says C{pip install .} installs is checked against a wheel built from the source.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from serverproc import BIN, REPO, start

DOC = REPO / "docs" / "deployment.md"


def _block(heading: str, language: str) -> str:
    """The first C{language} code block under C{heading} in docs/deployment.md."""
    text = DOC.read_text()
    start = text.index(f"\n{heading}\n")
    found = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert found is not None, f"no {language} block under {heading!r}"
    return found.group(1)


def _nginx() -> str:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed: `make test` installs it")
    return nginx


def _nginx_t(snippet: str, tmp_path: Path) -> None:
    """C{nginx -t} of C{snippet} inside an http block, in a prefix of its own."""
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
        [_nginx(), "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def _check_proxy(snippet: str) -> None:
    timeout = re.search(r"proxy_read_timeout (\d+)s;", snippet)
    assert timeout is not None and int(timeout.group(1)) > 60, snippet
    assert "proxy_request_buffering off;" in snippet
    assert "client_max_body_size" in snippet


def test_nginx_block_for_several_nodes_passes_nginx_t(tmp_path: Path) -> None:
    """The nginx block of "nginx in front of the nodes" (upstream of the nodes, uploads unbuffered, a read timeout above the 60 s long-poll) is accepted by `nginx -t` inside an http block, in a prefix of its own."""
    _nginx()
    snippet = _block("### nginx in front of the nodes", "nginx")
    _check_proxy(snippet)
    _nginx_t(snippet, tmp_path)


def test_nginx_block_behind_tls_passes_nginx_t(tmp_path: Path) -> None:
    """The nginx block of "Behind nginx" (listen 443 ssl) passes `nginx -t` as written, once its certificate and key exist: here a self-signed pair made by openssl, put at the paths the block names (rewritten into the test's directory)."""
    _nginx()
    snippet = _block("## Behind nginx", "nginx")
    _check_proxy(snippet)
    cert = re.search(r"^\s*ssl_certificate\s+(\S+);", snippet, re.M)
    key = re.search(r"^\s*ssl_certificate_key\s+(\S+);", snippet, re.M)
    assert cert is not None and key is not None, snippet
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=transcode.example.org",
         "-keyout", str(certs / "privkey.pem"), "-out", str(certs / "fullchain.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    snippet = snippet.replace(cert.group(1), str(certs / "fullchain.pem")).replace(
        key.group(1), str(certs / "privkey.pem")
    )
    _nginx_t(snippet, tmp_path)


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


def test_systemd_unit_passes_verify(tmp_path: Path) -> None:
    """The unit transcoder.service of "systemd" passes `systemd-analyze verify` (its twistd path pointed at this venv's), runs as the transcoder user, and takes its tokens from a systemd credential (LoadCredential=, %d) rather than a file the user must be able to read."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (systemd)")
    unit = _block("## systemd", "ini")
    assert "User=transcoder" in unit
    assert "LoadCredential=tokens:/etc/transcoder/tokens" in unit
    assert "--tokens %d/tokens" in unit
    unit = unit.replace("/opt/transcoder/venv/bin/twistd", str(BIN / "twistd"))
    (tmp_path / "transcoder.service").write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "transcoder.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "transcoder.service" not in result.stdout + result.stderr, result.stdout + result.stderr


def _doc_command(heading: str) -> tuple[dict[str, str], list[str]]:
    """The environment and argv of the first sh block under C{heading}."""
    words = shlex.split(_block(heading, "sh").replace("\\\n", " "))
    env = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def _listening_on(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on C{port} (from /proc/net)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                assert len(address) == width
                found.append(address)
    return found


@pytest.mark.parametrize(
    "heading", ["## twistd -ny tap.py", "## twistd web works, but costs memory"]
)
def test_foreground_examples_listen_on_loopback(heading: str, tmp_path: Path) -> None:
    """The `twistd -ny tap.py` and `twistd web` command lines of the guide, run as written (port 8080 made 0, the data dir and /opt's tap.py made the test's), serve on 127.0.0.1 only: the API is open without tokens."""
    env, argv = _doc_command(heading)
    assert argv[0] == "twistd"
    argv[0] = str(BIN / "twistd")
    swap = {
        "/var/lib/transcoder": str(tmp_path / "data"),
        "/opt/transcoder/tap.py": str(REPO / "tap.py"),
    }
    env = {k: swap.get(v, v).replace("tcp:8080:", "tcp:0:") for k, v in env.items()}
    argv = [swap.get(a, a).replace("tcp:8080:", "tcp:0:") for a in argv]
    assert any("tcp:0:interface=127.0.0.1" in x for x in [*argv, *env.values()]), (env, argv)
    server = start(argv, tmp_path / "data", tmp_path / "server.log", env=env)
    try:
        assert _listening_on(server.port) == ["0100007F"]
    finally:
        server.stop()


def test_pip_install_ships_what_the_guide_says(tmp_path: Path) -> None:
    """A wheel built from the source (what `pip install .` installs) holds the twistd plugin and the `transcoder` command, and no tap.py: so the guide copies tap.py from the source tree, and says so."""
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "data")
    )
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [str(BIN / "pip"), "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("transcoder-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "twisted/plugins/transcoder_plugin.py" in names
    assert "transcoder = transcoder.cli:main" in entry_points
    assert not [n for n in names if n.endswith("tap.py")], names
    guide = DOC.read_text()
    assert "install -m 644 tap.py /opt/transcoder/tap.py" in guide
    assert "tap.py is not part of the package" in guide


def test_every_option_and_its_variable_is_in_the_guide() -> None:
    """Every option of the service is named in the guide, as `--option` and as the `TRANSCODER_*` variable that tap.py and `twistd web` read it from (the guide says each option has one)."""
    from transcoder._env import variable_name
    from transcoder.service import Options

    text = DOC.read_text()
    names = [s.rstrip("=") for s in Options().longOpt if s.rstrip("=") not in ("help", "version")]
    assert "cors-origin" in names and "max-attempts" in names
    missing = [n for n in names if f"`--{n}`" not in text and f"`--{n} " not in text]
    assert missing == []
    assert [n for n in names if f"`{variable_name(n)}`" not in text] == []

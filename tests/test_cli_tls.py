"""
The command and the client against a server behind HTTPS: the service
itself on an C{ssl:} endpoint on loopback, with a self-signed certificate
made for the test (openssl).  --cacert trusts it, --insecure checks none,
and without either the failure is one line, not a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serverproc import LISTEN, ServerProcess, transcoder
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface.verify import verifyObject

from transcoder.client.cli import EXIT_CONNECTION, EXIT_OK, EXIT_USAGE
from transcoder.client.tls import Unverified, tls_policy


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (by IP) and its key."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


@dataclass
class _Tls:
    url: str
    cert: Path
    other: Path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Tls]:
    d = tmp_path_factory.mktemp("tls")
    key, cert = _certificate(d, "server")
    _, other = _certificate(d, "other")
    listen = LISTEN.replace("tcp:", "ssl:", 1) + f":privateKey={key}:certKey={cert}"
    argv = [transcoder(), "serve", "--listen", listen, "--data-dir", str(d / "data")]
    server = ServerProcess(d / "data", argv=argv)
    yield _Tls(f"https://127.0.0.1:{server.port}", cert, other)
    server.stop()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    return subprocess.run(
        [transcoder(), *args],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_untrusted_certificate_is_one_line(tls: _Tls) -> None:
    """
    Without --cacert, the self-signed certificate fails verification: exit 4
    and one line naming the server and the reason, with the options that
    help; no traceback.  A certificate from another authority fails the same.
    """
    for args in ([], ["--cacert", str(tls.other)]):
        done = _run("-s", tls.url, *args, "jobs")
        assert done.returncode == EXIT_CONNECTION, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"transcoder: cannot talk to {tls.url}: ")
        assert "certificate verify failed" in done.stderr
        assert "--cacert FILE" in done.stderr and "--insecure" in done.stderr
        assert done.stdout == ""


def test_another_hosts_certificate_is_one_line(tls: _Tls) -> None:
    """A trusted certificate that names another host (127.0.0.1, asked as localhost) fails too."""
    url = tls.url.replace("127.0.0.1", "localhost")
    done = _run("--cacert", str(tls.cert), "-s", url, "jobs")
    assert done.returncode == EXIT_CONNECTION, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "the certificate is not for this host" in done.stderr


def test_cacert_and_insecure(tls: _Tls, clips: Any, tmp_path: Path) -> None:
    """
    --cacert with the server's certificate, before or after the command,
    makes the whole job work over HTTPS (upload, wait, download); --insecure
    (-k) works without it; an unreadable --cacert is a usage error.
    """
    out = tmp_path / "out.mp4"
    done = _run(
        "--cacert", str(tls.cert), "-s", tls.url, "submit", str(clips.av),
        "-p", "mp4-h264", "--param", "preset=ultrafast", "-q", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == EXIT_OK, done.stderr
    assert out.stat().st_size > 0
    job_id = done.stdout.strip()
    listed = _run("jobs", "-s", tls.url, "--cacert", str(tls.cert))
    assert listed.returncode == EXIT_OK, listed.stderr
    assert job_id in listed.stdout
    insecure = _run("-k", "-s", tls.url, "status", job_id)
    assert insecure.returncode == EXIT_OK, insecure.stderr
    missing = _run("--cacert", str(tmp_path / "nope.pem"), "-s", tls.url, "jobs")
    assert missing.returncode == EXIT_USAGE
    assert "cannot read the --cacert file" in missing.stderr


_CLIENT = """
import sys
from transcoder.client import Blocking, TLSFailure, TranscoderError
url, cert = sys.argv[1], sys.argv[2]
with Blocking(url) as c:
    try:
        c.health()
    except TLSFailure as e:
        print(isinstance(e, TranscoderError), e.code, e.url)
with Blocking(url, cacert=cert) as c:
    print(c.health()["status"])
with Blocking(url, verify=False) as c:
    print(c.health()["status"])
"""


def test_python_client_over_tls(tls: _Tls) -> None:
    """The Python client: a TLSFailure (a TranscoderError) naming the URL; cacert= and verify=False work."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, tls.url, str(tls.cert)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"True tls_failed {tls.url}/health", "ok", "ok"]


def test_tls_policies(tls: _Tls, tmp_path: Path) -> None:
    """
    The policies provide IPolicyForHTTPS (and --insecure's creator its
    interface); a --cacert that cannot be read or holds no certificate is a
    ValueError saying so, before any request.
    """
    verifyObject(IPolicyForHTTPS, tls_policy())
    verifyObject(IPolicyForHTTPS, tls_policy(tls.cert))
    verifyObject(IPolicyForHTTPS, Unverified())
    verifyObject(IOpenSSLClientConnectionCreator, Unverified().creatorForNetloc(b"h", 443))
    assert isinstance(tls_policy(tls.cert, verify=False), Unverified)
    with pytest.raises(ValueError, match="cannot read the CA certificate"):
        tls_policy(tmp_path / "nope.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        tls_policy(garbage)

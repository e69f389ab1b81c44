"""
Security against a real server with --tokens: no endpoint but /health and
/metrics answers without a valid token, a bad token never gets C{100
Continue}, a token never reaches another token's jobs, and no value a client
sends reaches an encoder's argv unless it is a profile parameter that passed
its checks.

The argv is read where it lands: C{mencoder} and C{ffmpeg} are, for this
server, wrappers (first on its PATH) that write the argv they were given into
their working directory (the job's) and exit; the custom C{echo} profile is a
Python one-liner that does the same.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from serverproc import ServerProcess, wait_for
from test_malformed import MP, Reply, exchange, multipart, part, request

from transcoder.core.profiles import load_profiles

TOKENS = {"alice": "alice-secret-token-1", "bob": "bob-secret-token-2"}
RECORD = "argv.json"

WRAPPER = f"""#!{sys.executable}
import json, sys
with open({RECORD!r}, "w") as f:
    json.dump(sys.argv, f)
sys.exit(3)
"""


def _profiles_toml(python: str) -> str:
    record = f"import sys, json; json.dump(sys.argv, open({RECORD!r}, 'w')); sys.exit(3)"
    return f"""
[echo]
executable = {json.dumps(python)}
argv = ["-c", {json.dumps(record)}, "{{file}}", "--gain={{gain}}", "-q", "{{q}}",
        "-mode", "{{mode}}", "{{output}}"]

[echo.parameters.gain]
type = "float"
minimum = 0
maximum = 10
default = 1.0

[echo.parameters.q]
type = "int"
minimum = 1
maximum = 31
default = 4

[echo.parameters.mode]
type = "choice"
choices = ["fast", "slow"]
default = "fast"

[nap]
executable = {json.dumps(python)}
argv = ["-c", "import time; time.sleep(120)", "{{file}}", "{{output}}"]
timeout = 300

[copy]
executable = "/usr/bin/ffmpeg"
argv = ["-nostdin", "-y", "-v", "error", "-i", "{{file}}", "-c", "copy", "-f", "mp4", "{{output}}"]
output_extension = "mp4"
media_type = "video/mp4"
"""


@dataclass
class Setup:
    server: ServerProcess
    profiles: Path
    marker: Path
    clip: bytes


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, clips) -> Iterator[Setup]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hostile")
    bindir = root / "bin"
    bindir.mkdir()
    for name in ("mencoder", "ffmpeg"):
        (bindir / name).write_text(WRAPPER)
        (bindir / name).chmod(0o755)
    tokens = root / "tokens"
    tokens.write_text("".join(f"{n}:{t}\n" for n, t in TOKENS.items()))
    profiles = root / "profiles.toml"
    profiles.write_text(_profiles_toml(sys.executable))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    server = ServerProcess(
        root / "data",
        *("--tokens", str(tokens), "--profiles", str(profiles), "--workers", "2"),
        *("--min-free-disk", "0", "--idle-timeout", "5s"),
        env=env,
    )
    yield Setup(server, profiles, root / "pwned", clips.av.read_bytes())
    server.stop()
    assert "Traceback" not in server.output, server.output


def auth(who: str) -> str:
    return f"Authorization: Bearer {TOKENS[who]}"


def call(s: Setup, line: str, *headers: str, body: bytes = b"") -> Reply:
    method, _, target = line.partition(" ")
    return exchange(s.server.port, request(method, target, *headers, body=body))


def upload(s: Setup, who: str, profile: str) -> dict[str, object]:
    reply = call(s, f"PUT /jobs?profile={profile}", auth(who), body=s.clip)
    assert reply.status == 201, reply.raw[:500]
    return reply.json()


def wait_finished(s: Setup, who: str, job_id: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = call(s, f"GET /jobs/{job_id}?wait=5", auth(who)).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def alice_done(setup: Setup) -> dict[str, object]:
    """A job of Alice's that succeeded, with a result and a log."""
    job = upload(setup, "alice", "copy")
    done = wait_finished(setup, "alice", str(job["id"]))
    assert done["state"] == "succeeded", done
    return done


BAD_CREDENTIALS = [
    pytest.param((), id="none"),
    pytest.param(("Authorization: Bearer wrong-token",), id="unknown token"),
    pytest.param(("Authorization: Bearer ",), id="empty bearer"),
    pytest.param((f"Authorization: Bearer {TOKENS['alice']}x",), id="token plus a char"),
    pytest.param((f"Authorization: Bearer {TOKENS['alice'][:-1]}",), id="token minus a char"),
    pytest.param((f"Authorization: Basic {TOKENS['alice']}",), id="basic scheme"),
    pytest.param((f"Authorization: {TOKENS['alice']}",), id="no scheme"),
    pytest.param((f"X-Token: {TOKENS['alice']}",), id="other header"),
]


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
def test_without_a_valid_token_only_health_and_metrics_answer(
    setup: Setup, alice_done: dict[str, object], credentials: tuple[str, ...]
) -> None:
    """Every endpoint but /health and /metrics answers 401 JSON with a Bearer challenge, and says nothing of Alice's job, to a missing or bad token."""
    job = alice_done["id"]
    for line in [
        "GET /",
        "GET /jobs",
        "GET /jobs?state=succeeded",
        "GET /profiles",
        f"GET /jobs/{job}",
        f"GET /jobs/{job}?wait=1",
        f"HEAD /jobs/{job}/result",
        f"GET /jobs/{job}/result",
        f"GET /jobs/{job}/log",
        f"GET /jobs/{job}/log?tail=5",
        f"DELETE /jobs/{job}",
        f"GET /jobs/{job}?token={TOKENS['alice']}",
        "GET /nowhere",
        "POST /jobs?profile=copy",
    ]:
        body = setup.clip if line.startswith("POST") else b""
        reply = call(setup, line, *credentials, body=body)
        assert reply.status == 401, (line, reply.raw[:300])
        assert reply.headers["www-authenticate"].startswith("Bearer")
        if not line.startswith("HEAD"):
            assert reply.json()["error"]["code"] in ("unauthorized", "invalid_token")
        assert str(job).encode() not in reply.body
    for line in ["GET /health", "GET /metrics"]:
        assert call(setup, line, *credentials).status == 200
    # Alice's job is still there, untouched.
    assert call(setup, f"GET /jobs/{job}", auth("alice")).json()["state"] == "succeeded"


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
def test_bad_token_never_gets_100_continue(setup: Setup, credentials: tuple[str, ...]) -> None:
    """An upload that expects 100 Continue with a missing or bad token gets 401 at once, without 100 Continue, and nothing is written."""
    uploads = setup.server.data_dir / "uploads"
    reply = exchange(
        setup.server.port,
        request(
            "PUT",
            "/jobs?profile=copy",
            *credentials,
            "Content-Length: 104857600",
            "Expect: 100-continue",
        ),
    )
    assert b"100 Continue" not in reply.raw
    assert reply.status == 401, reply.raw[:300]
    assert not any(uploads.iterdir())


def test_a_token_cannot_read_download_cancel_or_delete_another_tokens_job(
    setup: Setup, alice_done: dict[str, object]
) -> None:
    """Bob gets 404 for each of Alice's jobs (finished or running) on every endpoint, does not see them listed, and his DELETE neither cancels nor removes them."""
    running = upload(setup, "alice", "nap")
    assert wait_for(
        lambda: (
            call(setup, f"GET /jobs/{running['id']}", auth("alice")).json()["state"] == "running"
        )
    )
    try:
        for job in (alice_done, running):
            for line in [
                f"GET /jobs/{job['id']}",
                f"GET /jobs/{job['id']}?wait=1",
                f"GET /jobs/{job['id']}/result",
                f"GET /jobs/{job['id']}/log",
                f"GET /jobs/{job['id']}/log?tail=3",
                f"DELETE /jobs/{job['id']}",
            ]:
                reply = call(setup, line, auth("bob"))
                assert reply.status == 404, (line, reply.raw[:300])
                assert reply.json()["error"]["code"] == "not_found"
        listed = call(setup, "GET /jobs?limit=500", auth("bob")).json()["jobs"]
        assert isinstance(listed, list)
        assert not {j["id"] for j in listed} & {alice_done["id"], running["id"]}
        for state in ("running", "succeeded"):
            listed = call(setup, f"GET /jobs?state={state}", auth("bob")).json()["jobs"]
            assert isinstance(listed, list) and listed == []

        # Nothing Bob did reached Alice's jobs.
        assert call(setup, f"GET /jobs/{running['id']}", auth("alice")).json()["state"] == (
            "running"
        )
        result = call(setup, f"GET /jobs/{alice_done['id']}/result", auth("alice"))
        assert result.status == 200 and len(result.body) > 0
    finally:
        assert call(setup, f"DELETE /jobs/{running['id']}", auth("alice")).status == 204


HOSTILE = [
    "-o /etc/passwd",
    "; touch {marker}",
    "$(touch {marker})",
    "`touch {marker}` | touch {marker} &",
    "../../../../etc/passwd",
    "7\n-o\n/tmp/x",
    "{output}",
]

# Profile -> the fields a client may send to it, parameters and control fields alike.
FIELDS = {
    "avi-mpeg4": ["vbitrate", "abitrate"],
    "mp4-h264": ["crf", "preset", "abitrate"],
    "echo": ["gain", "q", "mode"],
}
CONTROL = ["filename", "output", "callback_url", "sha256", "sha256.file", "profile"]


def _attempts(marker: Path) -> list[tuple[str, str, str, bytes]]:
    """(description, profile, request line or "multipart", body) for each hostile value in each field."""
    out = []
    for raw in HOSTILE:
        value = raw.replace("{marker}", str(marker))
        for profile, params in FIELDS.items():
            # The control fields mean the same to every profile: tried with the first one.
            extra = [*CONTROL, value] if profile == "avi-mpeg4" else []
            for name in [*params, *extra]:
                query = {"profile": profile, name: value}
                out.append(
                    (
                        f"{profile} ?{name}={value!r}",
                        profile,
                        "PUT /jobs?" + urllib.parse.urlencode(query),
                        b"",
                    )
                )
                fields = [part(k, v.encode()) for k, v in query.items()]
                out.append(
                    (f"{profile} form {name}={value!r}", profile, "multipart", b"".join(fields))
                )
            out.append((f"{profile} part filename {value!r}", profile, "filename", value.encode()))
    return out


def test_client_values_never_reach_an_encoders_argv(setup: Setup) -> None:
    """Shell metacharacters and option-looking values in every field, query parameter, part name and file name: refused (4xx JSON) or ignored; each accepted job's encoder got exactly the argv its profile builds from checked values."""
    profiles = load_profiles(setup.profiles)
    accepted: list[tuple[str, dict[str, object]]] = []
    refused = 0
    for what, profile, line, extra in _attempts(setup.marker):
        if line == "multipart":
            body = extra + multipart(part("file", setup.clip, b"clip.mp4"))
            reply = call(setup, "POST /jobs", MP, auth("alice"), body=body)
        elif line == "filename":
            body = multipart(
                part("profile", profile.encode()), part("file", setup.clip, filename=extra)
            )
            reply = call(setup, "POST /jobs", MP, auth("alice"), body=body)
        else:
            reply = call(setup, line, auth("alice"), body=setup.clip)
        assert reply.status is not None, what
        if reply.status == 201:
            accepted.append((what, reply.json()))
        else:
            assert 400 <= reply.status < 500, (what, reply.raw[:300])
            assert reply.json()["error"]["code"], what
            refused += 1
    assert refused > 0 and accepted, (refused, len(accepted))
    print(f"{refused + len(accepted)} hostile uploads: {refused} refused, {len(accepted)} accepted")

    for what, job in accepted:
        done = wait_finished(setup, "alice", str(job["id"]), timeout=60)
        job_dir = setup.server.data_dir / "jobs" / str(job["id"])
        profile = profiles[str(done["profile"])]
        inputs = {i.name: str(job_dir / i.path) for i in _inputs(job_dir, done)}
        want = profile.build_argv(
            inputs,
            str(job_dir / f"result.partial.{profile.output_extension}"),
            done["params"],  # type: ignore[arg-type]
        )
        got = json.loads((job_dir / RECORD).read_text())
        if profile.executable == sys.executable:
            # python -c CODE ...: sys.argv is ["-c", ...] without the code.
            assert got == ["-c", *want[3:]], what
            pairs = zip(profile.argv[2:], got[1:], strict=True)
        else:
            assert got[1:] == want[1:], what
            pairs = zip(profile.argv, got[1:], strict=True)
        for template, arg in pairs:
            # What filled each placeholder: a path in the job's directory or a checked value.
            pattern = re.sub(r"\\\{[a-z_]+\\\}", "(.*)", re.escape(template))
            m = re.fullmatch(pattern, arg, re.S)
            assert m is not None, (what, template, arg)
            for filled in m.groups():
                assert filled.startswith(f"{job_dir}/") or _checked(filled), (what, arg)
            for raw in HOSTILE:
                assert raw.replace("{marker}", str(setup.marker)) not in arg, (what, arg)
    assert not setup.marker.exists()


def _checked(arg: str) -> bool:
    """An argv element built from a template and checked parameter values: no space, no shell character, no leading dash."""
    return not arg.startswith("-") and not set(arg) & set(" \t\n;|&$`<>()'\"\\*?")


@dataclass
class _Input:
    name: str
    path: str


def _inputs(job_dir: Path, job: dict[str, object]) -> list[_Input]:
    out = []
    roles = job["inputs"]
    assert isinstance(roles, list)
    for i in roles:
        (path,) = job_dir.glob(f"input-{i['name']}*")
        out.append(_Input(i["name"], path.name))
    return out


def test_metacharacters_in_a_token_are_just_a_wrong_token(setup: Setup) -> None:
    """Tokens holding shell metacharacters, wildcards or a valid token plus more are refused with 401 like any wrong token."""
    for token in ["$(id)", "a;b", "%00", "Bearer Bearer", "*", TOKENS["alice"] + " x"]:
        reply = call(setup, "GET /jobs", f"Authorization: Bearer {token}")
        assert reply.status == 401, (token, reply.raw[:200])
        assert reply.json()["error"]["code"] in ("unauthorized", "invalid_token")
    assert call(setup, "GET /health").status == 200

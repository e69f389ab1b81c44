"""
Ambiguous requests and misleading answers (issue 14, finding 5): two
Authorization headers, a method the resource does not take sent with a body,
a file part named only by C{filename*}, integers with leading zeros, floats
that would reach argv as C{-0.0} or C{1e-07}, and file names that a download
would save as an option (C{-rf.mp4}) or a Windows device (C{NUL.mp4}).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from rawhttp import connect_raw, split_response
from serverproc import ServerProcess, no_uploads_left, wait_for

from transcoder.core.errors import Invalid
from transcoder.core.profiles import Profile, parse_profiles
from transcoder.http.names import content_disposition, sanitise_filename

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ambiguous")
    tokens = root / "tokens"
    tokens.write_text("".join(f"{n}:{t}\n" for n, t in TOKENS.items()))
    srv = ServerProcess(root / "data", "--tokens", str(tokens), "--min-free-disk", "0")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output, srv.output


async def exchange(
    server: ServerProcess, head: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    request = head.replace("\n", "\r\n").encode() + b"\r\nConnection: close\r\n\r\n" + body
    proto = await connect_raw(server.port, request)
    return split_response(await proto.closed)


def error_code(body: bytes) -> str:
    code = json.loads(body)["error"]["code"]
    assert isinstance(code, str)
    return code


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers_are_400_whichever_comes_last(
    server: ServerProcess,
) -> None:
    """Two Authorization headers (Bob's then Alice's, Alice's twice, a bad one then Alice's): 400 duplicate_header, never anyone's jobs; one valid header still lists jobs."""
    bob, alice = (f"Authorization: Bearer {TOKENS[n]}" for n in ("bob", "alice"))
    for first, second in [(bob, alice), (alice, alice), ("Authorization: Bearer x", alice)]:
        status, _, body = await exchange(server, f"GET /jobs HTTP/1.1\nHost: x\n{first}\n{second}")
        assert status == 400, body
        assert error_code(body) == "duplicate_header"
        assert b'"jobs"' not in body
    status, _, body = await exchange(server, f"GET /jobs HTTP/1.1\nHost: x\n{alice}")
    assert status == 200, body


@pytest_twisted.ensureDeferred
async def test_a_method_the_resource_does_not_take_is_405_before_its_body(
    server: ServerProcess,
) -> None:
    """PATCH and DELETE /jobs with a body (Content-Length or chunked): 405 method_not_allowed with Allow: GET, HEAD, POST, PUT, not 400 unexpected_body; nothing is staged; GET with a body is still 400 unexpected_body."""
    alice = f"Authorization: Bearer {TOKENS['alice']}"
    for method, framing, body in [
        ("PATCH", "Content-Length: 1", b"x"),
        ("DELETE", "Content-Length: 1", b"x"),
        ("PATCH", "Transfer-Encoding: chunked", b"1\r\nx\r\n0\r\n\r\n"),
    ]:
        status, headers, answer = await exchange(
            server,
            f"{method} /jobs?profile=avi-mpeg4 HTTP/1.1\nHost: x\n{alice}\n{framing}",
            body,
        )
        assert status == 405, (method, answer)
        assert error_code(answer) == "method_not_allowed"
        assert headers["allow"] == "GET, HEAD, POST, PUT"
    assert wait_for(lambda: no_uploads_left(server.data_dir))
    status, _, answer = await exchange(
        server, f"GET /jobs HTTP/1.1\nHost: x\n{alice}\nContent-Length: 1", b"x"
    )
    assert (status, error_code(answer)) == (400, "unexpected_body")


@pytest_twisted.ensureDeferred
async def test_a_file_part_named_only_by_filename_star_says_so(server: ServerProcess) -> None:
    """A multipart file part with filename*=UTF-8''a.mov and no filename= (and 64 KiB of bytes): 400 bad_multipart whose message names filename*, not "a form field is too long"; nothing is staged."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''a.mov"
        b"\r\nContent-Type: video/quicktime\r\n\r\n" + b"v" * 65536 + b"\r\n--XyZ--\r\n"
    )
    status, _, answer = await exchange(
        server,
        f"POST /jobs HTTP/1.1\nHost: x\nAuthorization: Bearer {TOKENS['alice']}\n"
        f"Content-Type: multipart/form-data; boundary=XyZ\nContent-Length: {len(body)}",
        body,
    )
    assert status == 400, answer
    message = json.loads(answer)["error"]["message"]
    assert error_code(answer) == "bad_multipart"
    assert "filename*" in message and "too long" not in message, message
    assert wait_for(lambda: no_uploads_left(server.data_dir))


# Parameters


def _echo() -> dict[str, Profile]:
    profiles = parse_profiles(
        """
[echo]
executable = "echo"
argv = ["--gain={gain}", "--shift={shift}", "-q", "{q}", "{file}", "{output}"]

[echo.parameters.gain]
type = "float"
minimum = 0
maximum = 10
default = 1.0

[echo.parameters.shift]
type = "float"
minimum = -5
maximum = 5
default = 0.0

[echo.parameters.q]
type = "int"
minimum = 1
maximum = 31
default = 4
"""
    )
    return dict(profiles)


@pytest.mark.parametrize(
    ("raw", "argv"),
    [
        ("-0", "--gain=0.0"),
        ("-0.0", "--gain=0.0"),
        ("-0.000", "--gain=0.0"),
        ("0.0000001", "--gain=0.0000001"),
        ("0.00000000000000000001", "--gain=0.00000000000000000001"),
        ("1", "--gain=1.0"),
        ("2.5", "--gain=2.5"),
        ("007.50", "--gain=7.5"),
    ],
)
def test_a_float_reaches_argv_in_plain_decimals_and_unsigned_when_its_range_is(
    raw: str, argv: str
) -> None:
    """A float of range [0, 10]: "-0", "-0.0" reach argv as 0.0, never -0.0; 1e-07 as 0.0000001, never in exponent form."""
    profile = _echo()["echo"]
    params = profile.validate_params({"gain": raw})
    built = profile.build_argv({"file": "/j/in"}, "/j/out", params)
    assert argv in built
    assert all(not a.startswith("-") or a.startswith("--") or a == "-q" for a in built)
    assert not any("e" in a.split("=", 1)[-1] for a in built if a.startswith("--"))


def test_a_negative_float_keeps_its_sign_where_its_range_allows_it() -> None:
    """A float of range [-5, 5]: -1.5 stays -1.5, -0.0000001 is written out, and -0 is 0.0."""
    profile = _echo()["echo"]
    for raw, text in [("-1.5", "-1.5"), ("-0.0000001", "-0.0000001"), ("-0", "0.0")]:
        params = profile.validate_params({"shift": raw})
        assert f"--shift={text}" in profile.build_argv({"file": "/j/in"}, "/j/out", params)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0000000000000000005", 5), ("0" * 40 + "10", 10), ("-0000000000000000000", 0)],
)
def test_an_integer_with_leading_zeros_is_that_integer(raw: str, value: int) -> None:
    """19 or more digits of which most are leading zeros: the integer they write, not "must be an integer"."""
    q = _echo()["echo"].parameters["q"]
    if value < 1:
        with pytest.raises(Invalid) as e:
            q.parse(raw)
        assert e.value.message == "parameter 'q' must be at least 1"
        return
    assert q.parse(raw) == value


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("1" * 19, "must be at most 31"),
        ("-" + "1" * 30, "must be at least 1"),
        ("1" * 5000, "must be at most 31"),
        ("12.5", "must be an integer"),
        ("1e3", "must be an integer"),
    ],
)
def test_an_integer_too_long_to_convert_is_out_of_range_not_a_non_integer(
    raw: str, why: str
) -> None:
    """An integer of range [1, 31] given 19, 30 or 5000 significant digits is out of its range, and says so; a fraction or exponent is not an integer."""
    with pytest.raises(Invalid) as e:
        _echo()["echo"].validate_params({"q": raw})
    assert e.value.message == f"parameter 'q' {why}"


# Names


@pytest.mark.parametrize(
    ("raw", "name", "saved"),
    [
        ("-rf .mov", "rf .mov", "rf.mov"),
        ("--help", "help", "help"),
        ("-.-x.flv", "x.flv", "x.flv"),
        ("NUL", "NUL_", "NUL_"),
        ("nul.mp4", "nul_.mp4", "nul_.mp4"),
        ("Con .tar.gz", "Con_.tar.gz", "Con_.tar.gz"),
        ("COM1.avi", "COM1_.avi", "COM1_.avi"),
        ("lpt9", "lpt9_", "lpt9_"),
        ("COM\u00b9.mp4", "COM\u00b9_.mp4", "COM1_.mp4"),
        ("CONSOLE.mp4", "CONSOLE.mp4", "CONSOLE.mp4"),
        ("COM10.mp4", "COM10.mp4", "COM10.mp4"),
        # Letters dropped from the ASCII name must not leave a dash or a device.
        ("\u0432-rf.mp4", "\u0432-rf.mp4", "rf.mp4"),
        ("\u0432\u0438CON.mp4", "\u0432\u0438CON.mp4", "CON_.mp4"),
    ],
)
def test_names_never_start_with_a_dash_nor_name_a_windows_device(
    raw: str, name: str, saved: str
) -> None:
    """A name loses its leading dashes (and dots); a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9, any case, with or without an extension) gets "_" after it, both as kept and as the ASCII filename curl -OJ saves."""
    assert sanitise_filename(raw) == name
    header = content_disposition(name)
    assert header.startswith(f'attachment; filename="{saved}"'), header


def test_a_result_is_never_named_for_an_option(tmp_path: Path) -> None:
    """The result of an input named "-rf .mov" is offered as "rf .mp4" (ASCII "rf.mp4"), not "-rf.mp4"."""
    from transcoder.http.job import result_filename

    class _Input:
        filename = sanitise_filename("-rf .mov")

    class _Output:
        path = str(tmp_path / "result.mp4")

    class _Job:
        inputs = [_Input()]
        output = _Output()

    name = result_filename(_Job())  # type: ignore[arg-type]
    assert name == "rf .mp4"
    assert content_disposition(name).startswith('attachment; filename="rf.mp4"')

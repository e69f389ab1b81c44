"""
Property-based tests (hypothesis) of the code that reads what clients and
encoders send: the streaming multipart reader (L{transcoder.http.formdata.MultipartBody}),
the sanitising of file names, and the progress parsers (beyond
C{tests/test_progress.py}: garbage never poisons later lines, and the figure
is the position over the duration).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import queue
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from transcoder.core.errors import DomainError
from transcoder.core.profiles import load_profiles
from transcoder.core.submit import Submission
from transcoder.engine.progress import MAX_LINE, FfmpegProgress, MencoderProgress
from transcoder.http.formdata import MultipartBody
from transcoder.http.names import MAX_NAME, content_disposition, extension, sanitise_filename

PROFILES = load_profiles()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ThreadReactor:
    """
    Just what the spool needs of a reactor: C{callFromThread}.  Calls are
    queued and run by L{pump} on the test's thread, as the reactor would run them.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def pump(self, d: Deferred[Any], timeout: float = 10.0) -> Any:
        """Run queued calls until C{d} fires; its result, or the Failure's exception."""
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            f, args = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args)
        result = results[0]
        return getattr(result, "value", result)


class Query:
    """A request as MultipartBody reads it: its query arguments, and no headers."""

    args: dict[bytes, list[bytes]] = {}
    requestHeaders = Headers()


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at C{cuts}, without empty chunks (see L{test_multipart_empty_chunk_is_not_the_end})."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in pairwise([0, *points, len(data)]) if b > a]


class Lender:
    """
    Lends chunks to a body as a L{transcoder.http.pump.SocketPump} does: each in a
    buffer of its own, an mmap, whose bytes must not change until the body
    gives it back (they are overwritten when it does, so a late reader sees
    garbage); and asks C{file_start} between buffers, as the pump does.
    """

    def __init__(self) -> None:
        self.lent = 0
        self.given = 0
        self.starts: list[int] = []
        self._buffers: list[mmap.mmap] = []

    def lend(self, body: MultipartBody, chunk: bytes) -> None:
        buf = mmap.mmap(-1, len(chunk))
        buf[:] = chunk
        self._buffers.append(buf)
        self.lent += 1

        def giveBack() -> None:
            buf[:] = b"\xee" * len(buf)
            self.given += 1

        body.lend(memoryview(buf), giveBack)
        self.starts.append(body.file_start())


def feed(
    boundary: str,
    chunks: list[bytes],
    length: int | None,
    lendFrom: int | None = None,
    lender: Lender | None = None,
) -> tuple[object, Path]:
    """
    Feed C{chunks} to a new MultipartBody and finish it.  Returns its
    Submission or the DomainError it raised (any other exception propagates),
    and the staging directory.  Chunks from index C{lendFrom} on are lent by
    C{lender}, as from a pump, the others received as from the reactor.
    """
    reactor = ThreadReactor()
    root = Path(tempfile.mkdtemp(prefix="mp-"))
    staging = root / "staging"
    try:
        body = MultipartBody(
            reactor,  # type: ignore[arg-type]
            Query(),  # type: ignore[arg-type]
            staging,
            "a" * 32,
            PROFILES,
            boundary,
            length,
            1 << 30,
        )
    except DomainError as e:
        shutil.rmtree(root)
        return e, staging
    outcome: object
    try:
        for i, chunk in enumerate(chunks):
            if lendFrom is not None and i >= lendFrom:
                assert lender is not None
                lender.lend(body, chunk)
            else:
                body.dataReceived(chunk)
        outcome = reactor.pump(body.finish())
    except DomainError as e:
        outcome = e
    if not isinstance(outcome, Submission):
        assert isinstance(outcome, DomainError), repr(outcome)
        body.abort()
        # abort() removes the files on the spool's thread.
        deadline = time.monotonic() + 10
        while staging.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not staging.exists(), "an aborted upload left its files"
    # Nothing is ever written beside the staging directory.
    assert [p.name for p in root.iterdir()] in ([], ["staging"])
    return outcome, staging


# Bytes that a multipart parser has to look at twice.
TRICKY = [b"\r\n", b"--", b"\r\n--", b"\r", b"\n", b"\r\n\r\n", b"\x00", b"-"]


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, bytes], dict[str, int]]:
    """A valid multipart body: (boundary, body, file contents by role, parameters)."""
    boundary = draw(st.from_regex(r"[A-Za-z0-9'()+_,.:=?-]{1,70}", fullmatch=True))
    delimiter = b"\r\n--" + boundary.encode()
    pieces = st.one_of(
        st.binary(max_size=300),
        st.sampled_from([*TRICKY, delimiter[:-1], b"--" + boundary.encode()[:-1]]),
    )
    profile = draw(st.sampled_from(["avi-mpeg4", "mux-avi"]))
    roles = PROFILES[profile].inputs
    contents: dict[str, bytes] = {}
    for role in roles:
        data = b"".join(draw(st.lists(pieces, max_size=12)))
        # A body whose content held the delimiter would be a different body.
        while delimiter in data:
            data = data.replace(delimiter, b"")
        # An empty file part is refused (empty_body), like an empty raw body.
        contents[role] = data or b"x"
    params: dict[str, int] = {}
    if profile == "avi-mpeg4" and draw(st.booleans()):
        params["vbitrate"] = draw(st.integers(100, 20000))
    names = st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\'),
        max_size=40,
    )
    parts = [(b'name="profile"', profile.encode())]
    parts += [(f'name="{k}"'.encode(), str(v).encode()) for k, v in params.items()]
    for role, data in contents.items():
        filename = draw(names)
        parts.append((f'name="{role}"; filename="{filename}"'.encode(), data))
    parts = draw(st.permutations(parts))
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + disposition
        + b"\r\n\r\n" + value + b"\r\n"
        for disposition, value in parts
    ) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
    return boundary, body, contents, params


@SETTINGS
@given(multipart_bodies(), st.lists(st.integers(min_value=0), max_size=30), st.booleans())
def test_multipart_any_split_stores_the_same_files(
    case: tuple[str, bytes, dict[str, bytes], dict[str, int]], cuts: list[int], known: bool
) -> None:
    """However a valid multipart body is cut into chunks (with or without its length), each file part is stored whole, with its size and SHA-256, and the parameters are read."""
    boundary, body, contents, params = case
    outcome, staging = feed(boundary, chunked(body, cuts), len(body) if known else None)
    assert isinstance(outcome, Submission), outcome
    try:
        assert {i.name for i in outcome.inputs} == set(contents)
        for i in outcome.inputs:
            stored = (staging / i.path).read_bytes()
            assert stored == contents[i.name]
            assert i.size == len(contents[i.name])
            assert i.sha256 == hashlib.sha256(contents[i.name]).hexdigest()
            assert (staging / i.path).parent == staging
        for name, value in params.items():
            assert outcome.params[name] == value
    finally:
        shutil.rmtree(staging.parent)


@SETTINGS
@given(
    multipart_bodies(),
    st.lists(st.integers(min_value=0), max_size=30),
    st.integers(min_value=0, max_value=40),
)
def test_multipart_lent_buffers_store_the_same_files(
    case: tuple[str, bytes, dict[str, bytes], dict[str, int]], cuts: list[int], lendFrom: int
) -> None:
    """However a valid body is cut, with any of its chunks lent from a pump's buffers instead of received (file bytes before a delimiter are written from the buffer itself), each file part is stored whole with its SHA-256, and every lent buffer is given back."""
    boundary, body, contents, _ = case
    lender = Lender()
    outcome, staging = feed(boundary, chunked(body, cuts), len(body), lendFrom, lender)
    assert isinstance(outcome, Submission), outcome
    try:
        for i in outcome.inputs:
            assert (staging / i.path).read_bytes() == contents[i.name]
            assert i.sha256 == hashlib.sha256(contents[i.name]).hexdigest()
        assert lender.given == lender.lent
    finally:
        shutil.rmtree(staging.parent)


def test_multipart_file_start_is_where_the_file_begins_in_the_body() -> None:
    """Between lent buffers inside a file part, file_start() is the body offset of that file's first byte (where a pump aligns its buffers to), and 0 outside file parts."""
    head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.flv"\r\n\r\n'
    )
    data = bytes(range(256)) * 64
    body = head + data + b"\r\n--XyZ--\r\n"
    cuts = [len(head) + 100, len(head) + 5000, len(head) + 9000, len(body) - 3]
    lender = Lender()
    outcome, staging = feed("XyZ", chunked(body, cuts), len(body), 0, lender)
    assert isinstance(outcome, Submission), outcome
    shutil.rmtree(staging.parent)
    assert lender.starts == [len(head)] * 3 + [0, 0]


@SETTINGS
@given(
    st.one_of(
        st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
        st.text(max_size=80),
    ),
    st.binary(max_size=4000),
    st.lists(st.integers(min_value=0), max_size=20),
    st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)),
)
def test_multipart_random_bytes_only_ever_raise_api_errors(
    boundary: str, data: bytes, cuts: list[int], length: int | None
) -> None:
    """Random bytes under any boundary and any declared length end in a DomainError (never another exception), and leave no file behind."""
    outcome, staging = feed(boundary, chunked(data, cuts), length)
    if isinstance(outcome, Submission):
        shutil.rmtree(staging.parent)


@SETTINGS
@given(
    multipart_bodies(),
    st.integers(min_value=0),
    st.integers(min_value=0, max_value=255),
    st.sampled_from(["truncate", "flip", "insert"]),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_multipart_damaged_bodies_only_ever_raise_api_errors(
    case: tuple[str, bytes, dict[str, bytes], dict[str, int]],
    where: int,
    byte: int,
    how: str,
    cuts: list[int],
) -> None:
    """A valid body truncated, with a byte changed or a byte inserted anywhere, is stored as sent or refused with a DomainError; never another exception, never a file left after a refusal."""
    boundary, body, _, _ = case
    at = where % (len(body) + 1)
    if how == "truncate":
        damaged = body[:at]
    elif how == "flip":
        damaged = body[:at] + bytes([byte]) + body[at + 1 :]
    else:
        damaged = body[:at] + bytes([byte]) + body[at:]
    outcome, staging = feed(boundary, chunked(damaged, cuts), len(damaged))
    if how == "truncate" and at < len(body) - 2:
        # Cut before its closing delimiter: it never ends.
        assert isinstance(outcome, DomainError)
    if isinstance(outcome, Submission):
        shutil.rmtree(staging.parent)


def test_multipart_empty_chunk_is_not_the_end() -> None:
    """An empty chunk in the middle of a body is no data, not the end of the body: the upload is stored as sent."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="profile"\r\n\r\navi-mpeg4\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.flv"\r\n\r\n'
        b"DATA\r\n--XyZ--\r\n"
    )
    outcome, staging = feed("XyZ", [body[:50], b"", body[50:]], len(body))
    assert isinstance(outcome, Submission), outcome
    shutil.rmtree(staging.parent)


_WINDOWS_DEVICE = re.compile(r"(?i)(CON|PRN|AUX|NUL|COM[1-9¹²³]|LPT[1-9¹²³]) *(\.|\Z)")
NAMES = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.text(alphabet="./\\ _-aZ9é\x00\n\u202e.", max_size=300),
    st.builds(
        lambda lead, device, tail: lead + device + tail,
        st.text(alphabet=" .-_ж", max_size=4),
        st.sampled_from(["CON", "nul", "Aux", "PRN", "COM1", "lpt9", "COM\u00b9"]),
        st.sampled_from(["", ".mp4", " .tar.gz", "_", "x.flv", "." + "a" * 130]),
    ),
    st.builds(lambda stem, ext: stem + "." + ext, st.text(max_size=200), st.text(max_size=12)),
)


@settings(max_examples=500)
@given(NAMES, st.sampled_from(["upload", "file", "input"]))
def test_sanitised_names_are_safe_and_stable(raw: str | bytes | None, default: str) -> None:
    """Any name, text or bytes, comes out non-empty, at most 120 characters, of safe characters only (letters, marks and digits of any script, and ._ ()+-): no path separator, NUL, control or direction override, no leading dot or dash, not a Windows device name, NFC; as a path it stays in its directory; sanitising it again changes nothing; and its Content-Disposition is ASCII, naming it exactly, with an ASCII name that starts with no dash either and is no device."""
    name = sanitise_filename(raw, default=default)
    assert 0 < len(name) <= MAX_NAME
    assert not name.startswith((".", "-"))
    assert not _WINDOWS_DEVICE.match(name)
    assert name not in (".", "..")
    assert all(c in "._ ()+-" or unicodedata.category(c)[0] in "LMN" for c in name), name
    assert unicodedata.is_normalized("NFC", name)
    header = content_disposition(name)
    assert header.isascii()
    star = re.search(r"filename\*=UTF-8''(\S+)$", header)
    plain = re.match(r'attachment; filename="([^"]+)"', header)
    assert plain is not None
    assert (unquote(star.group(1)) if star else plain.group(1)) == name
    assert not plain.group(1).startswith((".", "-"))
    assert not _WINDOWS_DEVICE.match(plain.group(1))
    assert (Path("/jobs/x") / name).parent == Path("/jobs/x")
    assert sanitise_filename(name, default=default) == name
    ext = extension(name)
    assert ext == "" or name.lower().endswith(ext)


@pytest.mark.parametrize(
    ("raw", "name", "header"),
    [
        (
            "видео.mp4",
            "видео.mp4",
            'attachment; filename="download.mp4"; '
            "filename*=UTF-8''%D0%B2%D0%B8%D0%B4%D0%B5%D0%BE.mp4",
        ),
        (
            "Cafe\u0301.mov",
            "Café.mov",
            "attachment; filename=\"Cafe.mov\"; filename*=UTF-8''Caf%C3%A9.mov",
        ),
        ("\u202eevil.mp4", "evil.mp4", 'attachment; filename="evil.mp4"'),
        ("a\u00a0b.flv", "a_b.flv", 'attachment; filename="a_b.flv"'),
    ],
)
def test_names_in_other_scripts_are_kept(raw: str, name: str, header: str) -> None:
    """A name in another script keeps its letters and extension (NFC); its download header is ASCII with the name in filename*; spaces other than " " and direction overrides go."""
    assert sanitise_filename(raw) == name
    assert content_disposition(name) == header


@given(
    st.text(alphabet="abc", min_size=1, max_size=20),
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
)
def test_sanitising_keeps_a_plain_extension(stem: str, ext: str) -> None:
    """However long the stem, a plain extension of up to 8 letters and digits survives."""
    for length in (1, 100, 1000):
        name = sanitise_filename((stem * length)[:5000] + "." + ext)
        assert extension(name) == "." + ext
        assert len(name) <= MAX_NAME


def _pos_line(seconds: float) -> bytes:
    return b"Pos: %5.1fs %6df (%2d%%) 184.05fps Trem:   0min   3mb  A-V:0.000 [0:0]\r" % (
        seconds,
        int(seconds * 25),
        42,
    )


@given(st.binary(max_size=3 * MAX_LINE), st.sampled_from([b"\r", b"\n"]), st.integers(0, 999))
def test_mencoder_garbage_never_poisons_the_next_line(
    garbage: bytes, end: bytes, tenths: int
) -> None:
    """Whatever came before (even a line far over MAX_LINE), a status line after a line end is read exactly."""
    p = MencoderProgress(duration=100.0)
    p.feed(garbage + end)
    assert p.feed(_pos_line(tenths / 10)) == pytest.approx(tenths / 10)


@given(st.binary(max_size=3 * MAX_LINE), st.integers(-(10**6), 10**9))
def test_ffmpeg_garbage_never_poisons_the_next_block(garbage: bytes, micros: int) -> None:
    """Whatever came before, a block after a line end gives its out_time_us over the duration, clamped to 0..100."""
    p = FfmpegProgress(duration=60.0)
    p.feed(garbage + b"\n")
    got = p.feed(b"frame=1\nout_time_us=%d\nprogress=continue\n" % micros)
    assert got == min(100.0, max(0.0, micros / 1e6 / 60.0 * 100.0))


@given(
    st.floats(min_value=0, max_value=1e5, allow_nan=False),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_mencoder_percentage_is_position_over_duration(
    position: float, duration: float | None
) -> None:
    """The percentage is the printed position over a usable duration, clamped to 0..100; with no usable duration it is the (NN%) figure."""
    line = _pos_line(position)
    m = re.search(rb"Pos:\s*([0-9.]+)s", line)
    assert m is not None
    shown = float(m.group(1))
    got = MencoderProgress(duration).feed(line)
    if duration is not None and math.isfinite(duration) and duration > 0:
        assert got == pytest.approx(min(100.0, max(0.0, shown / duration * 100.0)))
    else:
        assert got == 42.0

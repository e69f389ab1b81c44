"""
The private names of Twisted that transcoder uses (L{transcoder._twisted}):
each still exists in the installed Twisted and still does what the server
counts on, and no other module uses one directly.  When a Twisted upgrade
breaks one, these fail naming the name, the module to fix and the version.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

import transcoder
import twisted

PACKAGE = Path(transcoder.__file__).parent
TESTS = Path(__file__).parent
# Private names short and common enough that transcoder's own classes use them
# too (self._path, self._start, self._buffer): the check for direct uses
# elsewhere leaves them out.
GENERIC = frozenset({"_path", "_version", "_start", "_buffer", "state", "length", "contentLength"})


class Private(NamedTuple):
    owner: str
    name: str
    instance: bool = False


def _listed() -> tuple[Private, ...]:
    """
    transcoder._twisted.PRIVATE, read from the source: importing the module
    fails outright when a name it imports is gone, and then the test for
    that name should still say which and what to do.
    """
    for node in ast.parse((PACKAGE / "_twisted.py").read_text()).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "PRIVATE":
            assert isinstance(node.value, ast.Tuple)
            return tuple(
                Private(
                    *(ast.literal_eval(a) for a in call.args),
                    **{k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg},
                )
                for call in node.value.elts
                if isinstance(call, ast.Call)
            )
    raise AssertionError("transcoder/_twisted.py has no PRIVATE")


PRIVATE = _listed()


@pytest.fixture
def tw() -> ModuleType:
    """transcoder._twisted, imported by the tests that use it."""
    from transcoder import _twisted

    return _twisted


def _update(owner: str, name: str) -> str:
    return (
        f"{owner} no longer has {name}: transcoder/_twisted.py must be updated "
        f"for Twisted {twisted.__version__}"
    )


def _resolve(dotted: str) -> Any:
    """The module or class a dotted name gives (twisted.web.http.HTTPChannel)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


def _reading_head(data: bytes) -> tuple[http.HTTPChannel, list[http.Request]]:
    """A real channel given C{data}; and the requests it made, one per head read."""
    made: list[http.Request] = []

    class Recording(http.Request):
        def gotLength(self, length: int | None) -> None:
            made.append(self)
            super().gotLength(length)

        def process(self) -> None:
            self.processed = True

    channel = http.HTTPChannel()
    channel.requestFactory = Recording  # type: ignore[assignment]
    channel.makeConnection(StringTransport())
    channel.dataReceived(data)
    return channel, made


def _body(request: http.Request) -> bytes:
    """What the stock request kept of its body."""
    assert request.content is not None
    request.content.seek(0)
    body: bytes = request.content.read()
    return body


def _instance(owner: str) -> Any:
    """A real instance of C{owner}, in the state in which transcoder reads its private attributes."""
    if owner == "twisted.web.http.HTTPChannel":
        # In gotLength: the head is in, the body not yet.
        channel, _ = _reading_head(b"PUT /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        return channel
    if owner == "twisted.web.http._ChunkedTransferDecoder":
        # Inside a chunk, as a pump finds it.
        chunked = http._ChunkedTransferDecoder(lambda data: None, lambda rest: None)
        chunked.dataReceived(b"a\r\nabc")
        return chunked
    if owner == "twisted.web.http._IdentityTransferDecoder":
        return http._IdentityTransferDecoder(10, lambda d: None, lambda r: None)
    raise AssertionError(f"no instance of {owner} to check: add one to this test")


def _ids(names: tuple[Private, ...]) -> list[str]:
    return [f"{p.owner}.{p.name}" for p in names]


@pytest.mark.parametrize("private", PRIVATE, ids=_ids(PRIVATE))
def test_each_private_name_still_exists(private: Private) -> None:
    """Every private name transcoder/_twisted.py lists is still there in the installed Twisted: on its module or class, or on a real instance in the state in which it is read."""
    try:
        owner = _resolve(private.owner)
    except (ImportError, AttributeError):
        pytest.fail(_update(private.owner.rpartition(".")[0], private.owner.rpartition(".")[2]))
    target = _instance(private.owner) if private.instance else owner
    assert hasattr(target, private.name), _update(private.owner, private.name)


def test_chunked_decoder_states_are_the_ones_the_pump_knows() -> None:
    """The chunked decoder's states are still named CHUNK_LENGTH, BODY, CRLF, TRAILER and FINISHED (it dispatches on _dataReceived_<state>), the names chunked_position reports and a pump resumes from."""
    decoder = http._ChunkedTransferDecoder
    for state in ("CHUNK_LENGTH", "BODY", "CRLF", "TRAILER", "FINISHED"):
        assert hasattr(decoder, f"_dataReceived_{state}"), _update(
            "twisted.web.http._ChunkedTransferDecoder", f"the state {state}"
        )


def test_the_list_read_from_the_source_is_the_modules_own(tw: ModuleType) -> None:
    """The names read from transcoder/_twisted.py's source are its PRIVATE list."""
    assert PRIVATE == tuple(Private(p.owner, p.name, p.instance) for p in tw.PRIVATE)


def test_the_request_line_is_on_the_channel_in_gotLength(tw: ModuleType) -> None:
    """In gotLength the request has no method or URI yet, and request_line reads them from the channel; past_request_line tells a header line from the request line."""
    channel, made = _reading_head(b"POST /jobs?profile=x HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    assert len(made) == 1, "HTTPChannel no longer calls gotLength once the head is in"
    assert tw.past_request_line(channel)
    assert tw.request_line(channel) == (b"POST", b"/jobs?profile=x", b"HTTP/1.1"), _update(
        "twisted.web.http.HTTPChannel", "_command, _path and _version in gotLength"
    )
    fresh = http.HTTPChannel()
    fresh.makeConnection(StringTransport())
    assert not tw.past_request_line(fresh)


def test_the_channel_hooks_are_called(tw: ModuleType) -> None:
    """HookedHTTPChannel's framing_header sees a body's framing headers, and bad_request runs on a malformed request: the private methods they override are still called."""
    seen: list[tuple[bytes, bytes]] = []
    refused: list[bool] = []

    class Hooked(tw.HookedHTTPChannel):  # type: ignore[misc, name-defined]
        def framing_header(self, header: bytes, data: bytes) -> bytes:
            seen.append((header, data))
            return data

        def bad_request(self) -> None:
            refused.append(True)
            super().bad_request()

    channel = Hooked()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"PUT /jobs HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
    assert seen == [(b"Content-Length", b"3")], _update(
        "twisted.web.http.HTTPChannel", "a call to _maybeChooseTransferDecoder"
    )
    # A new connection: the first request, never answered, holds this one's next.
    channel = Hooked()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"PUT /jobs HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    assert refused == [True], _update(
        "twisted.web.http.HTTPChannel", "a call to _respondToBadRequestAndDisconnect"
    )
    assert transport.value().endswith(b"400 Bad Request\r\n\r\n")


def test_a_pump_can_take_a_chunked_body_over_and_give_it_back(tw: ModuleType) -> None:
    """chunked_position reads a chunked decoder mid-chunk; after resume_chunked_at_size_line the channel parses the next chunk's size line, and after take_rest_as_chunk_data any bytes are data: what a pump does when it stops."""
    channel, made = _reading_head(
        b"PUT /jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\na\r\nabc"
    )
    (request,) = made
    at = tw.chunked_position(channel)
    assert at == tw.ChunkedPosition(state="BODY", left=7, idle=True)
    # A pump reads the chunk's rest and the next chunk, up to the last one's size line.
    tw.resume_chunked_at_size_line(channel)
    channel.dataReceived(b"2\r\nxy\r\n0\r\n\r\n")
    assert _body(request) == b"abcxy"
    assert getattr(request, "processed", False), "the body should be complete"
    assert tw.chunked_position(channel) is None

    channel, made = _reading_head(b"PUT /jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    (request,) = made
    tw.take_rest_as_chunk_data(channel)
    channel.dataReceived(b"not\r\nframing")
    assert _body(request) == b"not\r\nframing"
    assert not getattr(request, "processed", False)


def test_skipped_bytes_of_a_known_length_body_are_not_waited_for(tw: ModuleType) -> None:
    """After skip_body_bytes(n), the channel's decoder of a Content-Length body ends n bytes sooner: a pump read them."""
    channel, made = _reading_head(b"PUT /jobs HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
    (request,) = made
    assert tw.chunked_position(channel) is None
    tw.skip_body_bytes(channel, 7)
    channel.dataReceived(b"abc")
    assert getattr(request, "processed", False)
    assert _body(request) == b"abc"


def test_a_request_knows_its_connection_is_gone(tw: ModuleType) -> None:
    """disconnected(request) turns True once its connection is lost."""
    channel, made = _reading_head(b"PUT /jobs HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
    (request,) = made
    assert not tw.disconnected(request)
    channel.connectionLost(Failure(ConnectionDone()))
    assert tw.disconnected(request)


def test_listen_errors_are_raised(tw: ModuleType) -> None:
    """raise_listen_errors makes StreamServerEndpointService.startService raise when it cannot listen."""

    class Refusing:
        def listen(self, factory: object) -> Any:
            from twisted.internet.defer import fail

            return fail(OSError("address in use"))

    service = StreamServerEndpointService(Refusing(), None)  # type: ignore[arg-type]
    tw.raise_listen_errors(service)
    with pytest.raises(OSError, match="address in use"):
        service.startService()


def test_request_not_sent_is_loaded_on_demand(tw: ModuleType) -> None:
    """transcoder._twisted.RequestNotSent is Twisted's client exception, loaded only when asked for (serve never loads the HTTP client)."""
    from twisted.web._newclient import RequestNotSent

    assert tw.RequestNotSent is RequestNotSent
    with pytest.raises(AttributeError):
        tw.__getattr__("NoSuchName")


def _private_uses(path: Path) -> Iterator[tuple[int, str]]:
    """(line, what) for every direct use of one of Twisted's private names in C{path}."""
    distinctive = {p.name for p in PRIVATE} - GENERIC
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "twisted":
                continue
            if any(part.startswith("_") for part in node.module.split(".")):
                yield node.lineno, f"imports from {node.module}"
            for alias in node.names:
                if alias.name.startswith("_"):
                    yield node.lineno, f"imports {alias.name} from {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("twisted") and "._" in alias.name:
                    yield node.lineno, f"imports {alias.name}"
        elif isinstance(node, ast.Attribute) and node.attr in distinctive:
            yield node.lineno, f"uses .{node.attr}"
        elif isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and method.name in distinctive:
                    yield method.lineno, f"overrides {method.name}"
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in distinctive
        ):
            yield node.lineno, f"names {node.value!r}"


def test_no_other_module_uses_a_private_name() -> None:
    """Outside transcoder/_twisted.py and this test, no module of the package or its tests imports a private Twisted name or module, or uses one of the private attributes _twisted.py wraps."""
    allowed = {PACKAGE / "_twisted.py", Path(__file__)}
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {what}"
        for root in (PACKAGE, TESTS)
        for path in sorted(root.rglob("*.py"))
        if path not in allowed
        for line, what in _private_uses(path)
    ]
    assert found == [], "use transcoder/_twisted.py instead:\n" + "\n".join(found)


def test_the_check_finds_a_direct_use(tmp_path: Path) -> None:
    """The check above catches each kind of direct use: a private import, a private module, a private attribute, an override, a getattr by name."""
    source = tmp_path / "bad.py"
    source.write_text(
        "from twisted.web.http import _ChunkedTransferDecoder\n"
        "from twisted.web._newclient import RequestNotSent\n"
        "x = channel._command\n"
        "class C:\n"
        "    def _respondToBadRequestAndDisconnect(self): pass\n"
        "y = getattr(request, '_disconnected', False)\n"
    )
    assert sorted(line for line, _ in _private_uses(source)) == [1, 2, 3, 5, 6]


def test_every_private_name_in_the_module_is_listed() -> None:
    """Each private name transcoder/_twisted.py imports or reads is in its PRIVATE list, and so is checked above."""
    listed = {p.name for p in PRIVATE}
    tree = ast.parse((PACKAGE / "_twisted.py").read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            used |= {a.name for a in node.names if a.name.startswith("_")}
            if "._" in (node.module or ""):
                used |= {a.name for a in node.names}
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if not node.attr.startswith("__") and not (
                isinstance(node.value, ast.Name) and node.value.id == "self"
            ):
                used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("_") and node.value.isidentifier():
                used.add(node.value)
    assert used - listed == set()

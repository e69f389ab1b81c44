"""Tests for L{transcoder.http.auth}: the tokens file and the bearer check."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from twisted.web.test.requesthelper import DummyRequest

from transcoder.http.auth import TokenAuth, TokenFileError
from transcoder.http.errors import APIError

FILE = """\
# service tokens
alice:alice-secret-1

bob: bob-secret-2
   # indented comment
bare-secret-3
alice:alice-secret-rotated
"""


def request_with(authorization: bytes | None) -> DummyRequest:
    request = DummyRequest([b"jobs"])
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization])
    return request


def test_parse_names_comments_and_bare_tokens() -> None:
    """Named tokens keep their names, bare ones get a name from their hash; comments and blanks are skipped."""
    auth = TokenAuth.parse(FILE)
    bare_name = "token-" + hashlib.sha256(b"bare-secret-3").hexdigest()[:12]
    assert auth.names == {"alice", "bob", bare_name}
    assert auth.check(b"alice-secret-1") == "alice"
    assert auth.check(b"alice-secret-rotated") == "alice"
    assert auth.check(b"bob-secret-2") == "bob"
    assert auth.check(b"bare-secret-3") == bare_name
    assert auth.check(b"# service tokens") is None
    assert auth.check(b"alice") is None
    assert auth.check(b"") is None


def test_from_file(tmp_path: Path) -> None:
    """from_file reads the same format from disk."""
    path = tmp_path / "tokens"
    path.write_text("ci:abc123\n")
    assert TokenAuth.from_file(path).check(b"abc123") == "ci"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no tokens"),
        ("# only a comment\n\n", "no tokens"),
        ("alice:\n", "line 1"),
        ("bad name:secret\n", "line 1"),
        ("ok:secret\nalice:two words\n", "line 2"),
        ("a:same\nb:same\n", "twice"),
        ("a:sécret\n", "line 1"),
    ],
)
def test_parse_refuses_bad_files(text: str, complaint: str) -> None:
    """A file with no tokens, a bad name or token, or a token listed twice is refused, saying where."""
    with pytest.raises(TokenFileError, match=complaint) as e:
        TokenAuth.parse(text)
    # The error never repeats a secret.
    for secret in ("secret", "same", "two words", "sécret"):
        assert secret not in str(e.value)


def test_check_compares_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check runs compare_digest against every token, wherever (or whether) the match is."""
    auth = TokenAuth([(f"t{i}", f"secret-{i}") for i in range(5)])
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token, name in [(b"secret-0", "t0"), (b"secret-4", "t4"), (b"nope", None)]:
        calls.clear()
        assert auth.check(token) == name
        assert len(calls) == 5


@pytest.mark.parametrize(
    "header", [b"Bearer alice-secret-1", b"bearer alice-secret-1", b"  Bearer   alice-secret-1  "]
)
def test_authenticate_accepts_bearer(header: bytes) -> None:
    """A known token after 'Bearer' (any case, extra spaces) authenticates as its name."""
    assert TokenAuth.parse(FILE).authenticate(request_with(header)) == "alice"


def test_authenticate_without_header() -> None:
    """No Authorization header: 401 unauthorized with a Bearer challenge."""
    with pytest.raises(APIError) as e:
        TokenAuth.parse(FILE).authenticate(request_with(None))
    assert e.value.status == 401
    assert e.value.code == "unauthorized"
    assert e.value.headers["WWW-Authenticate"] == 'Bearer realm="transcoder"'


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer wrong",
        b"Basic YWxpY2U6eA==",
        b"Bearer",
        b"Bearer ",
        b"alice-secret-1",
        b"Token alice-secret-1",
    ],
)
def test_authenticate_refuses_bad_credentials(header: bytes) -> None:
    """A wrong token, another scheme or a bare token: 401 invalid_token, with the RFC 6750 error in the challenge."""
    with pytest.raises(APIError) as e:
        TokenAuth.parse(FILE).authenticate(request_with(header))
    assert e.value.status == 401
    assert e.value.code == "invalid_token"
    assert 'error="invalid_token"' in e.value.headers["WWW-Authenticate"]
    assert e.value.headers["WWW-Authenticate"].startswith("Bearer ")

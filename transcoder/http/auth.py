"""
Bearer tokens: who may use the API, and under which name their jobs are kept.

A tokens file holds one token per line, either bare or as C{name:token};
blank lines and lines starting with C{#} are ignored.  A bare token's name is
derived from its hash, so logs and job records never hold the secret itself.
Several tokens may share a name (rotation): they then see the same jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from twisted.web.iweb import IRequest

from transcoder.http.errors import APIError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
_REALM = 'Bearer realm="transcoder"'


class TokenFileError(ValueError):
    """A tokens file is malformed (the message never quotes a token)."""


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-length digests hides the tokens' lengths as well as their bytes.
    return hashlib.sha256(secret).digest()


class TokenAuth:
    """
    Checks C{Authorization: Bearer <token>} against a fixed set of tokens.

    Every check compares the presented token with every known token, with
    L{hmac.compare_digest}, so its time depends on neither which token matched
    nor how much of one did.
    """

    def __init__(self, tokens: Iterable[tuple[str, str]]) -> None:
        """
        @param tokens: C{(name, token)} pairs.
        @raise TokenFileError: for no tokens, a bad name or token, or a token given twice.
        """
        self._tokens: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for name, token in tokens:
            self._check_pair(name, token)
            digest = _digest(token.encode("ascii"))
            if digest in seen:
                raise TokenFileError(f"token {name!r} is listed twice")
            seen.add(digest)
            self._tokens.append((digest, name))
        if not self._tokens:
            raise TokenFileError("no tokens")

    @staticmethod
    def _check_pair(name: str, token: str) -> None:
        if not _NAME.match(name):
            raise TokenFileError("a token name takes 1 to 64 of A-Z a-z 0-9 _ . @ -")
        if not _TOKEN.match(token):
            raise TokenFileError(f"token {name!r} is empty or holds spaces or non-ASCII")

    @classmethod
    def parse(cls, text: str) -> TokenAuth:
        """Tokens from the text of a tokens file."""
        pairs: list[tuple[str, str]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, token = line.partition(":")
            if not colon:
                token = line
                name = "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
            try:
                cls._check_pair(name.strip(), token.strip())
            except TokenFileError as e:
                raise TokenFileError(f"line {number}: {e}") from None
            pairs.append((name.strip(), token.strip()))
        return cls(pairs)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuth:
        """
        Tokens from a file.

        @raise OSError: if it cannot be read.
        @raise TokenFileError: if it is malformed.
        """
        return cls.parse(Path(path).read_text(encoding="utf-8"))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for _, name in self._tokens)

    def check(self, token: bytes) -> str | None:
        """The name of C{token}, or None if it is not known."""
        presented = _digest(token)
        found: str | None = None
        for digest, name in self._tokens:
            # No early exit: every token is compared every time.
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    def authenticate(self, request: IRequest) -> str:
        """
        The name of the token C{request} presents.

        @raise APIError: 401 with C{WWW-Authenticate} when it presents none or
            an unknown one; 400 when it has more than one C{Authorization}.
        """
        headers = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(headers) > 1:
            # Which one counts is a guess (Twisted takes the last): behind a
            # proxy that adds its own, the client's could win.  Not a 401,
            # which would invite a retry with other credentials: the request
            # itself is ambiguous (RFC 9110 5.3: not a list-valued field).
            raise APIError(
                400,
                "duplicate_header",
                f"the request has {len(headers)} Authorization headers; send exactly one",
            )
        header = headers[0] if headers else None
        if header is None:
            raise APIError(
                401,
                "unauthorized",
                "this endpoint needs an 'Authorization: Bearer <token>' header",
                {"WWW-Authenticate": _REALM},
            )
        scheme, _, credentials = header.strip().partition(b" ")
        name = None
        if scheme.lower() == b"bearer" and credentials.strip():
            name = self.check(credentials.strip())
        if name is None:
            raise APIError(
                401,
                "invalid_token",
                "the bearer token is not valid",
                {"WWW-Authenticate": _REALM + ', error="invalid_token"'},
            )
        return name

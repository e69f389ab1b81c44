"""
The client's errors: the server's error answers as L{TranscoderError}, and the
many failures of Twisted's HTTP client reduced to the few that
L{transcoder.client.api} documents, each a L{NetworkError} (a
L{TranscoderError} too) naming the URL and what failed.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from transcoder._twisted import RequestNotSent


class TranscoderError(Exception):
    """
    The server answered with an error (C{{"error": {"code", "message"}}}), or
    the answer was unusable.

    @ivar status: the HTTP status; 0 for a check made by the client itself.
    @ivar code: the server's machine-readable code, e.g. C{"unknown_profile"}.
    @ivar message: its explanation.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class NetworkError(TranscoderError):
    """
    The server could not be reached, the connection broke, or no answer came
    in time: C{status} is 0, C{url} the request's URL, C{method} its method,
    C{reason} what failed, and C{__cause__} Twisted's own exception.  Each
    kind is also the Twisted exception it stands for (L{CannotConnect} is a
    L{ConnectError}, ...), for code written against those.
    """

    code_name = "network_error"
    doing = "talking to"

    def __init__(self, method: str, url: str, reason: str) -> None:
        TranscoderError.__init__(
            self, 0, self.code_name, f"{self.doing} {url} ({method}): {reason}"
        )
        self.method = method
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return self.message


class CannotConnect(NetworkError, ConnectError):
    """No connection: refused, unreachable, a name that does not resolve, or too slow."""

    code_name = "cannot_connect"
    doing = "cannot connect to"

    def __init__(self, method: str, url: str, reason: str) -> None:
        NetworkError.__init__(self, method, url, reason)
        self.osError = None


class ConnectionLost(NetworkError, ResponseFailed):
    """The connection broke while the request was sent or its answer came: worth a retry."""

    code_name = "connection_lost"
    doing = "connection lost to"

    def __init__(self, method: str, url: str, reason: str, reasons: list[Failure]) -> None:
        NetworkError.__init__(self, method, url, reason)
        self.reasons = reasons
        self.response = None


class NoAnswer(NetworkError, DeferTimeoutError):
    """No answer, or no progress, within one of the client's time limits."""

    code_name = "timeout"
    doing = "no answer in time from"


class TLSFailure(NetworkError):
    """
    The TLS handshake failed, mostly a certificate that cannot be verified
    (self-signed, another host's, expired): not retried, since trying again
    gives the same answer.  C{--cacert} or C{--insecure} in the command.
    """

    code_name = "tls_failed"
    doing = "TLS with"


def _reason(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(_one_line(getattr(r, "value", r)) for r in reasons)
    if isinstance(e, ResponseFailed):
        return "connection lost"
    return _one_line(e)


def _one_line(e: object) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def _tls_reason(failures: list[Failure]) -> str | None:
    """What a failed handshake says (OpenSSL's errors), or None if it is not one."""
    for f in failures:
        if f.check("OpenSSL.SSL.Error"):
            details: list[str] = []
            for item in getattr(f.value, "args", [[]])[0] or []:
                # [(library, function, reason)], e.g. (..., "certificate verify failed")
                if isinstance(item, tuple) and item:
                    details.append(str(item[-1]))
            return "; ".join(details) or _one_line(f.value)
        if type(f.value).__module__.startswith("service_identity"):
            # The chain is trusted, but the certificate names another host.
            return f"the certificate is not for this host: {_one_line(f.value)}"
    return None


def as_network_error(e: BaseException, method: str, url: str) -> BaseException:
    """
    C{e}, a failure of Twisted's HTTP client (after L{network_failure}), as
    the L{NetworkError} that stands for it; anything else as it is.
    """
    if isinstance(e, NetworkError) or not isinstance(
        e, (ConnectError, DNSLookupError, ResponseFailed, DeferTimeoutError)
    ):
        return e
    if isinstance(e, (ConnectError, DNSLookupError)):
        return CannotConnect(method, url, _reason(e))
    if isinstance(e, DeferTimeoutError):
        return NoAnswer(method, url, _reason(e))
    reasons: list[Failure] = list(e.reasons or [])
    tls = _tls_reason(reasons)
    if tls is not None:
        return TLSFailure(method, url, tls)
    return ConnectionLost(method, url, _reason(e), reasons)


def network_failure(e: Exception) -> BaseException:
    """
    What to raise for a failure of Twisted's HTTP client, so that callers
    see the few exceptions the module documents rather than the many of
    C{twisted.web._newclient}: a cancelled request (by the caller or a
    timeout) as L{CancelledError}; a local error while producing the body
    (a file that shrank, a read error) as itself; a connection lost or
    unusable while the request was being sent as L{ResponseNeverReceived},
    a L{ResponseFailed}: no answer came, as when it breaks while waiting.
    """
    if isinstance(e, ConnectingCancelledError):
        return CancelledError()
    reasons: list[Failure] = list(getattr(e, "reasons", None) or [])
    if any(r.check(CancelledError) for r in reasons):
        return CancelledError()
    if isinstance(e, RequestGenerationFailed) and reasons and reasons[0].value is not None:
        return reasons[0].value
    if isinstance(e, RequestTransmissionFailed):
        return ResponseNeverReceived(reasons)
    if isinstance(e, RequestNotSent):
        return ResponseNeverReceived([Failure(e)])
    return e


async def error_from(response: Any) -> TranscoderError:
    try:
        text: bytes = await response.content()
    except Exception:
        text = b""
    return error_from_text(response, text)


def error_from_text(response: Any, text: bytes) -> TranscoderError:
    """The error an answer of status C{response.code} with body C{text} stands for."""
    try:
        error = json.loads(text)["error"]
        return TranscoderError(response.code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
        snippet = text[:200].decode("utf-8", "replace").strip()
        return TranscoderError(response.code, f"http_{response.code}", snippet or phrase)

"""
The client's errors: the server's error answers as L{TranscoderError}, and the
many failures of Twisted's HTTP client reduced to the few that
L{transcoder.client.api} documents.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
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
    try:
        error = json.loads(text)["error"]
        return TranscoderError(response.code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
        snippet = text[:200].decode("utf-8", "replace").strip()
        return TranscoderError(response.code, f"http_{response.code}", snippet or phrase)

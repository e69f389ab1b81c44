"""
The Python client (treq) and the C{transcoder} command's client side.

It imports nothing of the server.  Its names are loaded on first use, so
that C{transcoder serve}, whose entry point shares the command with the
client, never loads treq.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transcoder.client.api import Client
    from transcoder.client.blocking import Blocking
    from transcoder.client.bodies import ProgressCallback
    from transcoder.client.errors import (
        CannotConnect,
        ConnectionLost,
        NetworkError,
        NoAnswer,
        TLSFailure,
        TranscoderError,
    )
    from transcoder.client.jobs import RemoteJob

_WHERE = {
    "Blocking": "transcoder.client.blocking",
    "CannotConnect": "transcoder.client.errors",
    "Client": "transcoder.client.api",
    "ConnectionLost": "transcoder.client.errors",
    "NetworkError": "transcoder.client.errors",
    "NoAnswer": "transcoder.client.errors",
    "ProgressCallback": "transcoder.client.bodies",
    "RemoteJob": "transcoder.client.jobs",
    "TLSFailure": "transcoder.client.errors",
    "TranscoderError": "transcoder.client.errors",
}
__all__ = [
    "Blocking",
    "CannotConnect",
    "Client",
    "ConnectionLost",
    "NetworkError",
    "NoAnswer",
    "ProgressCallback",
    "RemoteJob",
    "TLSFailure",
    "TranscoderError",
]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

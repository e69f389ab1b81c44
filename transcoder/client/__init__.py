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
    from transcoder.client.bodies import ProgressCallback
    from transcoder.client.errors import TranscoderError
    from transcoder.client.jobs import RemoteJob

_WHERE = {
    "Client": "transcoder.client.api",
    "ProgressCallback": "transcoder.client.bodies",
    "RemoteJob": "transcoder.client.jobs",
    "TranscoderError": "transcoder.client.errors",
}
__all__ = ["Client", "ProgressCallback", "RemoteJob", "TranscoderError"]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

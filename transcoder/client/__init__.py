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
    from transcoder.client.api import Client, ProgressCallback, RemoteJob, TranscoderError

__all__ = ["Client", "ProgressCallback", "RemoteJob", "TranscoderError"]


def __getattr__(name: str) -> object:
    if name in __all__:
        return getattr(import_module("transcoder.client.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

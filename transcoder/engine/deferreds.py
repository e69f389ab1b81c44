"""Letting go of a Deferred the engine no longer wants."""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred

_T = TypeVar("_T")


def abandon(d: Deferred[_T]) -> None:
    """Cancel C{d} if it is still waiting, and swallow whatever it ends with."""
    if not d.called:
        d.cancel()
    d.addErrback(lambda _: None)

"""A job as the client sees it: the server's JSON description of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transcoder.client.errors import TranscoderError

FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class RemoteJob:
    """A job as the server last described it; C{data} is the whole JSON."""

    id: str
    profile: str
    state: str
    progress: float
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def from_json(cls, data: Any) -> RemoteJob:
        try:
            return cls(
                id=str(data["id"]),
                profile=str(data["profile"]),
                state=str(data["state"]),
                progress=float(data.get("progress") or 0.0),
                params=dict(data.get("params") or {}),
                inputs=list(data.get("inputs") or []),
                output=data.get("output"),
                error=data.get("error"),
                data=dict(data),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TranscoderError(0, "bad_response", f"not a job: {e!r}") from None


JobCallback = Callable[[RemoteJob], None]

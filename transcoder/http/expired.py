"""410 C{expired}: the answer for a job that retention removed (L{Tombstones})."""

from __future__ import annotations

from transcoder.core.tombstones import Tombstone, Tombstones
from transcoder.http.errors import APIError
from transcoder.http.views import rfc3339


def _span(seconds: float) -> str:
    """C{7d}, C{36h}, C{90m}, C{45s}: the --keep-results a job was removed under."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def expired_error(stone: Tombstone) -> APIError:
    finished = rfc3339(stone.finished_at) or "unknown"
    return APIError(
        410,
        "expired",
        f"job {stone.job_id} expired: it finished at {finished} and was removed with its "
        f"results at {rfc3339(stone.removed_at)}, as this server keeps finished jobs for "
        f"{_span(stone.kept)} (--keep-results); run it again",
    )


def find_expired(
    tombstones: Tombstones | None, job_id: str, owner: str | None, *, private: bool
) -> APIError | None:
    """
    The 410 for C{job_id} if retention removed it, else None.  With tokens
    (C{private}), another token's removed job stays a plain 404.
    """
    if tombstones is None:
        return None
    stone = tombstones.find(job_id)
    if stone is None or (private and stone.owner != owner):
        return None
    return expired_error(stone)

"""
Tombstones: what is left of a job that retention removed, so that asking for it
answers "expired" (410) rather than "no such job" (404).

Retention removes a job's row and files; the id alone cannot tell a removed job
from one that never existed (ids are random).  So before removing a job, the
sweeper writes a small file C{<data dir>/expired/<id[:2]>/<id>}: its owner (so
that another token still gets 404), when it finished and when it was removed.
The data directory, not the job store, because it is there on every kind of
store and, with several nodes, shared by all of them.  A tombstone is kept for
L{TOMBSTONE_KEEP} after the removal (its mtime is that time); each sweep prunes
one of the 256 shards, so every shard is pruned at least once a day.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transcoder.core.jobs import Job, is_job_id

# How long a removed job answers "expired" before it is a plain "no such job".
TOMBSTONE_KEEP = 30 * 86400.0
_SHARDS = [f"{i:02x}" for i in range(256)]


@dataclass(frozen=True)
class Tombstone:
    job_id: str
    owner: str | None
    finished_at: float | None
    removed_at: float
    # The --keep-results the job was removed under, in seconds.
    kept: float


class Tombstones:
    """The tombstones under C{root} (C{<data dir>/expired})."""

    def __init__(self, root: Path, keep: float = TOMBSTONE_KEEP) -> None:
        self.root = root
        self._keep = keep
        self._next_shard = 0

    def _path(self, job_id: str) -> Path:
        return self.root / job_id[:2] / job_id

    def bury(self, job: Job, now: float, kept: float) -> None:
        """Record C{job} as removed at C{now} by retention; written whole or not at all."""
        path = self._path(job.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"owner": job.owner, "finished_at": job.finished_at, "kept": kept}
        partial = path.with_name(f".{job.id}.partial")
        partial.write_text(json.dumps(record))
        # The mtime is the removal's time: pruning needs a stat, not a read.
        os.utime(partial, (now, now))
        os.replace(partial, path)

    def find(self, job_id: str) -> Tombstone | None:
        """The tombstone of C{job_id}, or None (never removed by retention, or long ago)."""
        if not is_job_id(job_id):
            return None
        path = self._path(job_id)
        try:
            removed_at = path.stat().st_mtime
            record: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return Tombstone(
            job_id=job_id,
            owner=record.get("owner"),
            finished_at=record.get("finished_at"),
            removed_at=removed_at,
            kept=float(record.get("kept") or 0),
        )

    def prune(self, now: float) -> int:
        """Remove the tombstones older than the keep from the next shard; how many went."""
        shard = self.root / _SHARDS[self._next_shard]
        self._next_shard = (self._next_shard + 1) % len(_SHARDS)
        removed = 0
        try:
            entries = list(os.scandir(shard))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.stat().st_mtime + self._keep <= now:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                # Another node pruned it first.
                continue
        return removed

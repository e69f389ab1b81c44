"""
Putting the tus uploads together for L{transcoder.service.makeService}: the
upload store beside the job store (SQLite, or the cluster's PostgreSQL), the
lock (in-process, or across nodes), the sweeper, the metrics.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transcoder.core.profiles import Profile
from transcoder.core.registry import JobRegistry
from transcoder.core.sqliteuploads import SQLiteUploadStore
from transcoder.core.stores import StoreURL
from transcoder.core.uploads import InProcessUploadLocks, IUploadLocks, IUploadStore
from transcoder.core.uploadsweep import UploadSweeper
from transcoder.http.tusproto import tus_error
from transcoder.http.tusupload import TusUploads


def disk_check(directory: Path, min_free: int) -> Any:
    """The 507 a plain upload gets, for an upload of C{length} bytes (None: unknown)."""

    def check(length: int | None) -> None:
        if not min_free:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(directory).free - (length or 0) < min_free:
            raise tus_error(
                507, "insufficient_storage", "the server is short of disk space; try again later"
            )

    return check


def build_tus(
    reactor: Any,
    registry: JobRegistry,
    profiles: Mapping[str, Profile],
    data_dir: Path,
    store_url: StoreURL,
    max_size: int,
    expiry: float,
    min_free: int,
    metrics: Any = None,
) -> tuple[TusUploads, UploadSweeper]:
    """The L{TusUploads} of this node and the sweeper of its expired uploads."""
    store: IUploadStore
    locks: IUploadLocks
    orphan_grace = 0.0
    if store_url.kind == "postgresql":
        # Any node continues any upload: records and locks in the shared database.
        from transcoder.core.pguploadlocks import PostgresUploadLocks
        from transcoder.core.pguploads import PostgresUploadStore

        store = PostgresUploadStore(store_url.target, reactor)
        locks = PostgresUploadLocks(store_url.target, reactor)
        # Another node makes an upload's directory just before its record.
        orphan_grace = 600.0
    else:
        store = SQLiteUploadStore(Path(store_url.target), reactor)
        locks = InProcessUploadLocks(reactor)
    event = getattr(metrics, "tus_event", None)
    if metrics is not None and event is None:
        from transcoder.http.tusmetrics import TusMetrics

        event = TusMetrics(metrics.registry).event
    uploads = TusUploads(
        reactor,
        registry,
        profiles,
        store,
        locks,
        data_dir,
        max_size,
        expiry,
        check_disk=disk_check(data_dir / "tus", min_free),
        event=event or (lambda what, n: None),
    )

    def expired(upload_id: str) -> None:
        uploads.forget(upload_id)
        uploads.event("expired", 0)

    # Every minute, or sooner for a short expiry (an upload lives at most a quarter longer).
    interval = max(1.0, min(60.0, expiry / 4))
    sweeper = UploadSweeper(
        reactor, store, locks, uploads.dir, expired, interval=interval, orphan_grace=orphan_grace
    )
    return uploads, sweeper

"""
The cluster's own gauges, read from the shared database at each scrape:
jobs queued in the whole cluster, and jobs running on each node (the live
nodes, at 0 when idle, and any node that still holds a lease).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from transcoder.core.pgside import SideDatabase

ClusterGauges = tuple[int, dict[str, int]]


def read_cluster_gauges(db: SideDatabase) -> Deferred[ClusterGauges]:
    """Fires with (jobs queued, {node: jobs running})."""

    def read(conn: Any) -> ClusterGauges:
        row = conn.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()
        rows = conn.execute(
            "SELECT coalesce(n.name, j.node), count(j.id) FROM nodes n"
            " FULL JOIN (SELECT id, node FROM jobs WHERE state = 'running') j ON j.node = n.name"
            " GROUP BY 1"
        ).fetchall()
        return int(row[0]), {str(name): int(count) for name, count in rows}

    return db.call(read)

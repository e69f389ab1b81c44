"""C{GET /nodes}: the live nodes sharing this node's job store, each with its load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from transcoder.core.errors import Unavailable
from transcoder.http.responses import EndResource, disconnected, write_error, write_json
from transcoder.http.views import rfc3339

_log = Logger()

NodeLister = Callable[[], Deferred[list[dict[str, Any]]]]


def this_node(registry: Any, name: str, clock: Any) -> NodeLister:
    """A lister for a node with a store of its own: itself, alive now."""
    started = clock.seconds()

    def lister() -> Deferred[list[dict[str, Any]]]:
        now = clock.seconds()
        node = {"name": name, "workers": getattr(registry, "workers", 0),
                "running": registry.running_count, "started_at": started,
                "heartbeat_at": now}  # fmt: skip
        return succeed([node])

    return lister


class NodesResource(EndResource):
    """
    The nodes C{lister} gives (name, workers, running, started_at and
    heartbeat_at as Unix times), newest heartbeat first in their order.
    """

    def __init__(self, lister: NodeLister) -> None:
        super().__init__()
        self._lister = lister

    def render_GET(self, request: server.Request) -> int:
        def listed(nodes: list[dict[str, Any]]) -> None:
            body = [
                {
                    "name": n["name"],
                    "workers": n["workers"],
                    "running": n["running"],
                    "started_at": rfc3339(n["started_at"]),
                    "heartbeat_at": rfc3339(n["heartbeat_at"]),
                }
                for n in nodes
            ]
            _send(request, write_json(request, 200, {"nodes": body}))

        def failed(f: Failure) -> None:
            _log.failure("could not list the nodes", f)
            refusal = Unavailable("store_unavailable", "the job store cannot be read right now", 5)
            _send(request, write_error(request, refusal))

        self._lister().addCallbacks(listed, failed)
        return server.NOT_DONE_YET


def _send(request: server.Request, body: bytes) -> None:
    if disconnected(request):
        return
    request.write(body)
    request.finish()

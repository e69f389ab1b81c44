"""
The HTTP API's resource tree, from its root:

  - C{/jobs}: uploads and the listing (L{transcoder.http.jobs}), each job
    below it (L{transcoder.http.job});
  - C{/profiles}, C{/nodes}, C{/health}, C{/metrics};
  - C{/ui/}, the web page (L{transcoder.http.ui}), where C{/} sends browsers.

With tokens configured, the root authenticates every request while the tree is
traversed, so an upload with a bad token is refused before its body is read
(see L{transcoder.http.request.TranscoderRequest}), and a token sees only its own jobs.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource, Resource

from transcoder import __version__
from transcoder.core.errors import DomainError
from transcoder.core.profiles import Profile
from transcoder.core.registry import JobRegistry
from transcoder.core.tombstones import Tombstones
from transcoder.http.auth import TokenAuth
from transcoder.http.errors import not_found
from transcoder.http.jobs import FreeDisk, JobsResource, UploadReport, free_space
from transcoder.http.nodes import NodeLister, NodesResource, this_node
from transcoder.http.responses import (
    EndResource,
    ErrorResource,
    JSONResource,
    write_error,
    write_json,
)
from transcoder.http.spool import Opener, _open
from transcoder.http.tus import UploadsResource
from transcoder.http.tusjobs import from_uploads
from transcoder.http.tusproto import cors
from transcoder.http.tusupload import TusUploads
from transcoder.http.ui import RedirectToUI, UIResource, wants_html

log = Logger()

# Reachable without a token: load balancers and Prometheus carry none, and the
# page (C{/ui/}) must load before it can ask for one.
PUBLIC = frozenset({b"health", b"metrics", b"ui"})
# Where browsers on --cors-origin origins may go.
CORS_PATHS = frozenset({b"jobs", b"uploads"})


class ProfilesResource(EndResource):
    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        super().__init__()
        self._profiles = profiles

    def render_GET(self, request: server.Request) -> bytes:
        return write_json(
            request, 200, {"profiles": [p.to_json() for p in self._profiles.values()]}
        )


class HealthResource(EndResource):
    def __init__(
        self,
        registry: JobRegistry,
        data_dir: Path,
        min_free_disk: int = 0,
        free_disk: FreeDisk = free_space,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._data_dir = data_dir
        self._min_free = min_free_disk
        self.free_space = free_disk

    def render_GET(self, request: server.Request) -> bytes:
        free = self.free_space(self._data_dir)
        store_error = self._registry.store_error
        body: dict[str, object] = {
            # Still up with too little disk: downloads and status work, uploads get 507.
            "status": "ok" if free >= self._min_free else "low_disk",
            "version": __version__,
            "queued": self._registry.queued_count,
            "running": self._registry.running_count,
            "free_disk": free,
            "min_free_disk": self._min_free,
        }
        if store_error is not None:
            # 503, so that a balancer sends uploads elsewhere: none is taken here.
            body["status"] = "store_failing"
            body["store_error"] = store_error
            return write_json(request, 503, body)
        return write_json(request, 200, body)


class GuardedResource(JSONResource):
    """
    Another library's leaf resource (C{/metrics}) behind JSON errors: methods
    other than C{GET}/C{HEAD} get a JSON 405 and sub-paths a JSON 404, rather
    than whatever the wrapped resource would do.
    """

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        if request.postpath and request.postpath != [b""]:
            return write_error(request, not_found())
        return super().render(request)

    # Named, so that the Allow of a 405 (here, or before an upload's body) lists them.
    def render_GET(self, request: server.Request) -> bytes | int:
        result: bytes | int = self._inner.render(request)
        return result

    render_HEAD = render_GET


class PreflightResource(Resource):
    """A CORS preflight from an allowed origin: 200, its headers set already."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        request.setResponseCode(200)
        request.setHeader(b"Content-Length", b"0")
        return b""


# What the index links to, in this order, when the server has it.
_LINKED = ("jobs", "uploads", "profiles", "nodes", "health", "metrics", "ui")


class RootResource(JSONResource):
    """
    C{/}: a pointer to the rest.  With tokens, every child but L{PUBLIC} ones
    is reached only with a valid token, whose name goes on C{request.owner}.
    With C{cors_origins}, browsers on those origins may use C{/jobs} and
    C{/uploads} (a preflight carries no token, and needs none).
    """

    def __init__(self, auth: TokenAuth | None = None, cors_origins: Sequence[str] = ()) -> None:
        super().__init__()
        self._auth = auth
        self._cors = tuple(cors_origins)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:  # type: ignore[override]
        if path == b"" and not request.postpath and wants_html(request):
            # A browser, token or none: the page asks for the token itself.
            return RedirectToUI()
        if self._cors and path in CORS_PATHS and cors(request, self._cors):
            return PreflightResource()
        if self._auth is not None and path not in PUBLIC:
            try:
                request.owner = self._auth.authenticate(request)  # type: ignore[attr-defined]
            except DomainError as e:
                return ErrorResource(e)
        if path == b"":
            return self
        child: IResource = super().getChildWithDefault(path, request)
        return child

    def render_GET(self, request: server.Request) -> bytes:
        # Browsers get a redirect to the page from the same URL.
        request.setHeader(b"Vary", b"Accept")
        return write_json(
            request,
            200,
            {
                "service": "transcoder",
                "version": __version__,
                "links": {
                    name: f"/{name}/" if name == "ui" else f"/{name}"
                    for name in _LINKED
                    if name.encode() in self.children
                },
            },
        )


def _metrics(registry: JobRegistry, data_dir: Path) -> tuple[IResource, UploadReport] | None:
    try:
        from transcoder.http.metrics import Metrics
    except ImportError:
        log.warn("transcoder.http.metrics is not available: /metrics answers 404")
        return None
    metrics = Metrics(registry, data_dir)
    # Follows the registry from now on, to time the jobs that end.
    metrics.start()
    return metrics.resource(), metrics.upload_finished


def build_root(
    reactor: IReactorThreads,
    registry: JobRegistry,
    profiles: Mapping[str, Profile],
    data_dir: Path,
    max_upload_size: int,
    opener: Opener = _open,
    *,
    clock: IReactorTime | None = None,
    auth: TokenAuth | None = None,
    min_free_disk: int = 0,
    free_disk: FreeDisk = free_space,
    metrics: Any = None,
    nodes: NodeLister | None = None,
    node_name: str | None = None,
    tombstones: Tombstones | None = None,
    tus: TusUploads | None = None,
    cors_origins: Sequence[str] = (),
) -> Resource:
    """
    The whole resource tree.

    @param reactor: runs the upload spool's threads; also times long-polls
        unless C{clock} is given.
    @param auth: the tokens; without them the API is open to anyone who can reach it.
    @param min_free_disk: uploads are refused (507) below this much free space.
    @param metrics: a L{transcoder.http.metrics.Metrics} (started and stopped by
        the caller), or just a C{/metrics} resource; by default a new Metrics,
        started here, which then also counts uploads.
    @param nodes: lists the nodes sharing the job store, for C{/nodes};
        by default this one alone, named C{node_name} (the host name).
    @param tombstones: the jobs retention removed, answered 410 C{expired}.
    @param tus: resumable uploads at C{/uploads}; none without it.
    @param cors_origins: origins whose browsers may use C{/jobs} and C{/uploads}.
    """
    upload_finished: UploadReport | None = None
    if metrics is None:
        made = _metrics(registry, data_dir)
        if made is not None:
            metrics, upload_finished = made
    elif hasattr(metrics, "upload_finished"):
        metrics, upload_finished = metrics.resource(), metrics.upload_finished
    if auth is None:
        log.warn("no --tokens: the API is open to anyone who can reach it")
    else:
        log.info("API tokens: {count} names", count=len(auth.names))
    root = RootResource(auth, cors_origins)
    root.putChild(
        b"jobs",
        JobsResource(
            reactor,
            registry,
            profiles,
            max_upload_size,
            opener,
            clock=clock,
            private=auth is not None,
            min_free_disk=min_free_disk,
            free_disk=free_disk,
            upload_finished=upload_finished,
            tombstones=tombstones,
            from_uploads=from_uploads(tus) if tus is not None else None,
        ),
    )
    if tus is not None:
        root.putChild(b"uploads", UploadsResource(tus))
        if upload_finished is not None:
            # A job made from a tus upload counts as a plain upload's does.
            tus.report = upload_finished
    root.putChild(b"profiles", ProfilesResource(profiles))
    root.putChild(
        b"nodes",
        NodesResource(
            nodes or this_node(registry, node_name or socket.gethostname(), clock or reactor)
        ),
    )
    root.putChild(b"health", HealthResource(registry, data_dir, min_free_disk, free_disk))
    root.putChild(b"ui", UIResource())
    if metrics is not None:
        root.putChild(b"metrics", GuardedResource(metrics))
    return root

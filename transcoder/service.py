"""
The service: one L{Options} and one L{makeService}, shared by C{transcoder
serve}, the twistd plugin and C{tap.py}.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from transcoder._twisted import raise_listen_errors
from transcoder.core.cluster import ClusterRegistry
from transcoder.core.jobs import IClusterStore
from transcoder.core.pggauges import read_cluster_gauges
from transcoder.core.pgside import SideDatabase
from transcoder.core.pgwebhooks import PostgresWebhooks
from transcoder.core.profiles import ProfileError, load_profiles
from transcoder.core.registry import STORE_HEADROOM, JobRegistry
from transcoder.core.retention import RetentionSweeper
from transcoder.core.stores import BadStoreURL, StoreURL, open_store, parse_store_url
from transcoder.core.tombstones import Tombstones
from transcoder.engine.deathsig import warn_if_unavailable
from transcoder.engine.probe import tool_env
from transcoder.engine.runner import execute_job
from transcoder.http.auth import TokenAuth, TokenFileError
from transcoder.http.clusterhooks import ClusterWebhookNotifier
from transcoder.http.metrics import Metrics
from transcoder.http.nodes import NodeLister
from transcoder.http.publicurl import normal_public_url, public_url_problem
from transcoder.http.resources import build_root
from transcoder.http.site import TranscoderSite
from transcoder.http.tuswiring import build_tus
from transcoder.http.webhooks import WebhookNotifier

log = Logger()

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.I)


def parse_size(text: str) -> int:
    """C{"8G"}, C{"512M"}, C{"100k"}, C{"1024"}: bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if m is None:
        raise usage.UsageError(f"not a size: {text!r} (try 8G, 512M, 100k)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_duration(text: str) -> float:
    """C{"30s"}, C{"5m"}, C{"7d"}, C{"90"} (seconds)."""
    m = _DURATION.match(text)
    if m is None:
        raise usage.UsageError(f"not a duration: {text!r} (try 30s, 5m, 2h, 7d)")
    unit = (m.group(2) or "s").lower()
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    return float(m.group(1)) * scale


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be at least 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


class Options(usage.Options):
    """Options of the transcoding service (C{transcoder serve}, C{twistd transcoder})."""

    synopsis = "[options]"
    longdesc = "An HTTP video transcoding service: uploads streamed to disk, mencoder/ffmpeg jobs."

    optParameters: list[list[Any]] = [
        [
            "listen",
            "l",
            "tcp:8080:interface=127.0.0.1",
            "Endpoint to listen on (Twisted endpoint string).",
        ],
        ["data-dir", "d", "./data", "Directory for uploads, results and the job database."],
        [
            "store",
            None,
            None,
            "Job database: sqlite:PATH or postgresql://user@host:port/db "
            "(default: sqlite:DATA_DIR/jobs.sqlite3).",
        ],
        ["max-upload-size", None, "8G", "Largest upload accepted (bytes, or with k/M/G/T)."],
        ["profiles", None, None, "TOML file of profiles extending (or replacing) the built-ins."],
        [
            "workers",
            "w",
            None,
            "Encoders run at once (default: the number of CPUs; 0: this node takes "
            "uploads and serves the API but runs no encoder).",
            _count,
        ],
        [
            "node-name",
            None,
            None,
            "This node's name in a shared (postgresql) store (default: the host name).",
        ],
        [
            "lease",
            None,
            "30s",
            "With a postgresql store: how long a running job stays this node's without a "
            "renewal (renewed every third of it).",
        ],
        [
            "max-attempts",
            None,
            3,
            "With a postgresql store: a job whose lease expired this many times fails.",
            _positive_int,
        ],
        [
            "max-queued",
            None,
            1000,
            "Queued jobs (uploads under way included) beyond which uploads get 503.",
            _positive_int,
        ],
        ["job-timeout", None, "1h", "Default time limit of a job, for profiles that set none."],
        ["kill-grace", None, "5s", "Time between TERM and KILL when stopping an encoder."],
        [
            "max-input-duration",
            None,
            "4h",
            "Fail a job at its probe when an input is longer than this.",
        ],
        ["idle-timeout", None, "60s", "Close connections idle (nothing received) this long."],
        ["tokens", None, None, "File of bearer tokens (one per line, or name:token); none: open."],
        [
            "webhook-secret",
            None,
            None,
            "Sign job-finished webhooks with HMAC-SHA256 and this secret.",
        ],
        [
            "keep-results",
            None,
            "7d",
            "Remove finished jobs and their files after this long "
            "(up to a tenth later, at most 5 minutes).",
        ],
        [
            "min-free-disk",
            None,
            "1G",
            "Refuse uploads (507) while the data dir has less free space "
            "(at least 1M, kept for the job database).",
        ],
        ["shutdown-grace", None, "30s", "On SIGTERM, give in-flight uploads this long to finish."],
        [
            "public-url",
            None,
            None,
            "The service's URL as clients reach it (e.g. https://transcode.example.org behind "
            "a proxy): webhook bodies' URLs start with it (default: the upload's Host header).",
        ],
        [
            "upload-expiry",
            None,
            "24h",
            "Remove a resumable (tus) upload this long after its last byte.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["cors-origin"] = []

    def opt_cors_origin(self, origin: str) -> None:
        """Let browsers on ORIGIN use /jobs and /uploads (CORS); repeatable; none by default."""
        self["cors-origin"].append(origin)

    def postOptions(self) -> None:
        self["max-upload-size"] = parse_size(self["max-upload-size"])
        self["min-free-disk"] = parse_size(self["min-free-disk"])
        for key in (
            "job-timeout",
            "kill-grace",
            "max-input-duration",
            "idle-timeout",
            "keep-results",
            "shutdown-grace",
            "lease",
            "upload-expiry",
        ):
            self[key] = parse_duration(self[key])
        if self["public-url"]:
            problem = public_url_problem(self["public-url"])
            if problem is not None:
                raise usage.UsageError(f"--public-url {problem}")
            self["public-url"] = normal_public_url(self["public-url"])
        if self["lease"] < 1:
            raise usage.UsageError("--lease: at least 1s")
        if not self["node-name"]:
            self["node-name"] = socket.gethostname()
        if self["workers"] is None:
            self["workers"] = os.cpu_count() or 1
        try:
            self["store-url"] = parse_store_url(self["store"]) if self["store"] else None
        except BadStoreURL as e:
            raise usage.UsageError(f"--store: {e}") from None
        try:
            self["tokens-loaded"] = (
                TokenAuth.from_file(Path(self["tokens"])) if self["tokens"] else None
            )
        except (OSError, TokenFileError) as e:
            raise usage.UsageError(f"--tokens: {e}") from None
        try:
            self["profiles-loaded"] = load_profiles(
                Path(self["profiles"]) if self["profiles"] else None
            )
        except (OSError, ProfileError) as e:
            raise usage.UsageError(f"--profiles: {e}") from None


class _Hooked(Service):
    """Runs start/stop callables with the service (metrics, webhooks, retention)."""

    def __init__(self, start: Any, stop: Any) -> None:
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        result: Deferred[None] | None = self._stop()
        return result


class TranscoderService(MultiService):
    """
    The whole service.  Children start in order (metrics and webhooks, the
    registry, retention, the listener); stopping is sequential and in reverse:
    stop accepting connections, let uploads under way finish within the
    grace, then stop retention, the encoders (their jobs go back to the
    queue), and last the hooks.
    """

    def __init__(self, site: Any, grace: float) -> None:
        super().__init__()
        self.site = site
        self.grace = grace

    async def _stop(self) -> None:
        children = list(self)
        children.reverse()
        for child in children:
            await maybeDeferred(child.stopService)
            if isinstance(child, StreamServerEndpointService):
                drain = getattr(self.site, "drain", None)
                if drain is not None:
                    await drain(self.grace)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        Service.stopService(self)
        return ensureDeferred(self._stop())


class RegistryService(Service):
    """Starts the job registry (recovery, scheduling) and stops it with the service."""

    def __init__(self, registry: JobRegistry) -> None:
        self.registry = registry

    def startService(self) -> None:
        super().startService()
        self.registry.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.registry.stop()


# glibc's mallopt() parameter number for the arena limit (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas() -> bool:
    """
    Make glibc's malloc use its main arena for every thread, unless the
    environment sets C{MALLOC_ARENA_MAX} (the operator's choice wins).

    By default each thread that allocates gets an arena of its own, and memory
    freed there stays resident: after a 1 GiB upload the server kept about
    2 MiB more than at start-up with the upload path of db3de1f (pump and
    writer threads), 7 to 16 MiB with the one before it (9abb107), and a
    download after that peaked over 60 MiB.  With one arena the same memory is
    reused by the next request and trimmed; the upload and download benches
    showed no loss of speed.

    @return: whether the limit was set (False off glibc, or when the
        environment decides).
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, 1))


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The whole service: metrics and webhooks, the job registry, retention, the
    HTTP listener.  Limits malloc to one arena first (L{limit_malloc_arenas}),
    before any of the service's threads allocates.
    """
    limit_malloc_arenas()
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    data_dir = Path(options["data-dir"]).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    profiles = options["profiles-loaded"]
    store_url: StoreURL = options.get("store-url") or StoreURL(
        "sqlite", str(data_dir / "jobs.sqlite3")
    )
    # Raises StoreUnavailable, naming the URL without its password.
    store = open_store(store_url, reactor)

    cluster: dict[str, Any] = {}
    registry_type: type[JobRegistry] = JobRegistry
    side: SideDatabase | None = None
    if IClusterStore.providedBy(store):
        registry_type = ClusterRegistry
        # Webhooks, retention's lock and the cluster's metrics.
        side = SideDatabase(store_url.target, reactor)
        cluster = {
            "node": options["node-name"],
            "lease": options["lease"],
            "max_attempts": options["max-attempts"],
            "side": side,
        }
    registry = registry_type(
        reactor,
        store,
        data_dir,
        profiles,
        **cluster,
        workers=options["workers"],
        max_queued=options["max-queued"],
        job_timeout=options["job-timeout"],
        kill_grace=options["kill-grace"],
        max_input_duration=options["max-input-duration"],
        executor=partial(
            execute_job,
            # Encoders stop before the disk is too full to record their jobs' ends.
            disk_reserve=STORE_HEADROOM,
        ),
    )
    nodes: NodeLister | None = None
    if isinstance(registry, ClusterRegistry):
        # Raises NodeNameTaken (a StoreUnavailable) when a live node has the name.
        registry.register(options["workers"])
        nodes = registry.nodes
    metrics = Metrics(
        registry, data_dir, cluster=partial(read_cluster_gauges, side) if side else None
    )
    secret = options["webhook-secret"]
    notifier: WebhookNotifier
    if side is not None:
        # Deliveries in the shared database: any node sends them.
        notifier = ClusterWebhookNotifier(
            reactor,
            registry,
            queue=PostgresWebhooks(side),
            node=options["node-name"],
            secret=secret.encode("utf-8") if secret else None,
            base_url=options["public-url"] or "",
        )
    else:
        notifier = WebhookNotifier(
            reactor,
            registry,
            secret=secret.encode("utf-8") if secret else None,
            journal=data_dir / "webhooks",
            base_url=options["public-url"] or "",
        )
    # In the data dir: shared by the nodes of a cluster, whatever the store.
    tombstones = Tombstones(data_dir / "expired")
    sweeper = RetentionSweeper(
        reactor, registry, keep=options["keep-results"], tombstones=tombstones
    )
    tus, tus_sweeper = build_tus(
        reactor,
        registry,
        profiles,
        data_dir,
        store_url,
        options["max-upload-size"],
        options["upload-expiry"],
        max(options["min-free-disk"], STORE_HEADROOM),
        metrics,
    )
    root = build_root(
        reactor,
        registry,
        profiles,
        data_dir,
        options["max-upload-size"],
        auth=options["tokens-loaded"],
        # Even --min-free-disk 0 keeps room for the job states still to be written.
        min_free_disk=max(options["min-free-disk"], STORE_HEADROOM),
        metrics=metrics,
        nodes=nodes,
        node_name=options["node-name"],
        tombstones=tombstones,
        tus=tus,
        cors_origins=options["cors-origin"],
    )
    site = TranscoderSite(root, reactor=reactor, idle_timeout=options["idle-timeout"])

    def start_hooks() -> None:
        # Before the registry starts, so that jobs its recovery ends are seen too.
        metrics.start()
        notifier.start()

    def stop_hooks() -> Deferred[None] | None:
        notifier.stop()
        metrics.stop()
        return side.close() if side is not None else None

    top = TranscoderService(site, options["shutdown-grace"])
    _Hooked(start_hooks, stop_hooks).setServiceParent(top)
    RegistryService(registry).setServiceParent(top)
    _Hooked(sweeper.start, sweeper.stop).setServiceParent(top)
    _Hooked(tus_sweeper.start, tus_sweeper.stop).setServiceParent(top)
    # After the registry: finishes the uploads a crash or a refusal left without their job.
    _Hooked(tus.start, tus.stop).setServiceParent(top)
    listener = StreamServerEndpointService(serverFromString(reactor, options["listen"]), site)
    raise_listen_errors(listener)
    listener.setServiceParent(top)
    log.info(
        "transcoder: data in {data_dir}, jobs in {store}, {workers} workers, node {node}, "
        "profiles: {profiles}",
        data_dir=str(data_dir),
        store=str(store_url),
        workers=options["workers"],
        node=options["node-name"],
        profiles=", ".join(profiles),
    )
    warn_if_unavailable(tool_env()["PATH"])
    return top

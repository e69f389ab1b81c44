"""
The client for programs that are not Twisted ones: every call of
L{Client} as a plain blocking call, run on the reactor in a thread of its
own.

    from transcoder.client import Blocking

    with Blocking("http://127.0.0.1:8080") as client:
        job = client.submit(Path("clip.mp4"), "mp4-h264", {"crf": 28})
        job = client.wait(job.id)
        client.download(job.id, Path("out.mp4"))

The reactor is Twisted's global one, started on first use in a daemon
thread and stopped when the interpreter exits; a process has one, so a
Twisted program (whose reactor already runs) uses L{Client} instead.
Progress callbacks are called in the reactor's thread.  Ctrl-C (or any
exception) while a call blocks cancels what the call was doing.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure

from transcoder.client.api import Client
from transcoder.client.bodies import ProgressCallback
from transcoder.client.jobs import JobCallback, RemoteJob

_T = TypeVar("_T")

_lock = threading.Lock()
_thread: list[threading.Thread] = []


def _running_reactor() -> Any:
    """The global reactor, running in this module's thread (started on first use)."""
    from twisted.internet import reactor

    with _lock:
        if _thread and _thread[0].is_alive():
            return reactor
        if reactor.running:
            raise RuntimeError(
                "the reactor already runs in this process (a Twisted program): "
                "use transcoder.client.Client"
            )
        thread = threading.Thread(
            target=reactor.run,
            kwargs={"installSignalHandlers": False},
            name="transcoder-reactor",
            daemon=True,
        )
        thread.start()
        _thread[:] = [thread]
        atexit.register(_stop, reactor, thread)
    return reactor


def _stop(reactor: Any, thread: threading.Thread) -> None:
    if thread.is_alive():
        reactor.callFromThread(reactor.stop)
        thread.join(5)


class Blocking:
    """
    L{Client}'s calls, blocking; the same arguments (C{token}, C{cacert},
    C{verify}, timeouts), the same results and the same exceptions
    (L{TranscoderError} and its network subclasses).  C{with Blocking(...)
    as client:} closes it at the end of the block.
    """

    def __init__(self, base_url: str, token: str | None = None, **options: Any) -> None:
        self._reactor = _running_reactor()
        # Made in the reactor's thread, as everything that touches the reactor.
        self._client: Client = self._call(
            lambda: succeed(Client(base_url, token, self._reactor, **options))
        )

    def _call(self, fn: Callable[..., Deferred[_T]], *args: Any, **kw: Any) -> _T:
        """Run C{fn} in the reactor's thread; its (Deferred's) result, or its exception."""
        results: queue.Queue[Any] = queue.Queue(maxsize=1)
        started: list[Deferred[Any]] = []
        # A Ctrl-C may come before the reactor's thread has run start(): the call must then
        # never begin (a submit would otherwise go on in the background and make a job).
        cancelled = threading.Event()

        def start() -> None:
            if cancelled.is_set():
                return
            d = maybeDeferred(fn, *args, **kw)
            started.append(d)
            d.addBoth(results.put)

        def cancel() -> None:
            # In the reactor's thread, after start() (callFromThread keeps the order): what
            # started is seen there even when this thread looked too early.
            for d in started:
                d.cancel()

        self._reactor.callFromThread(start)
        try:
            result = results.get()
        except BaseException:
            # Ctrl-C: what the call was doing stops (a half-sent upload is dropped).
            cancelled.set()
            self._reactor.callFromThread(cancel)
            raise
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def __enter__(self) -> Blocking:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close kept-alive connections (the reactor's thread stays, for other clients)."""
        self._call(self._client.close)

    def submit(
        self,
        inputs: Mapping[str, Path] | Path,
        profile: str,
        params: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        **options: Any,
    ) -> RemoteJob:
        """L{Client.submit}: C{filename=}, C{callback_url=}, C{sha256=} too."""
        return self._call(self._client.submit, inputs, profile, params, on_progress, **options)

    def get(self, job_id: str) -> RemoteJob:
        """L{Client.get}."""
        return self._call(self._client.get, job_id)

    def wait(
        self, job_id: str, on_progress: JobCallback | None = None, poll: float = 30.0
    ) -> RemoteJob:
        """L{Client.wait}: the job once it has finished, whichever way."""
        return self._call(self._client.wait, job_id, on_progress, poll)

    def download(
        self,
        job_id: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        retries: int = 5,
        overwrite: bool = True,
    ) -> Path:
        """L{Client.download}."""
        return self._call(
            self._client.download, job_id, Path(path), on_progress, retries, overwrite
        )

    def download_outputs(
        self,
        job_id: str,
        directory: Path,
        on_progress: ProgressCallback | None = None,
        retries: int = 5,
    ) -> list[Path]:
        """L{Client.download_outputs}."""
        return self._call(
            self._client.download_outputs, job_id, Path(directory), on_progress, retries
        )

    def cancel(self, job_id: str) -> None:
        """L{Client.cancel}: deletes the job, stopping it first if it runs."""
        self._call(self._client.cancel, job_id)

    def jobs(self, state: str | None = None, *, page_size: int = 100) -> Iterator[RemoteJob]:
        """Every job, newest first, fetched a page at a time as the iteration goes."""
        cursor: str | None = None
        while True:
            jobs: list[RemoteJob]
            jobs, cursor = self._call(self._client.page, state, page_size, cursor)
            yield from jobs
            if cursor is None or not jobs:
                return

    def profiles(self) -> list[dict[str, Any]]:
        """L{Client.profiles}."""
        return self._call(self._client.profiles)

    def log(self, job_id: str, tail: int | None = None) -> str:
        """L{Client.log}."""
        return self._call(self._client.log, job_id, tail)

    def health(self) -> dict[str, Any]:
        """L{Client.health}."""
        return self._call(self._client.health)

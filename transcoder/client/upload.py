"""
Uploading the inputs of a job (L{Client.submit}): a raw body or multipart,
streamed from disk, with watchdogs on its silences, and each file's SHA-256
compared with what the server stored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred

from transcoder.client.bodies import FilePart, ProgressCallback, StreamingBody
from transcoder.client.errors import NoAnswer, TranscoderError
from transcoder.client.jobs import RemoteJob
from transcoder.client.retry import Watchdog

if TYPE_CHECKING:
    from transcoder.client.api import Client


async def upload(
    client: Client,
    inputs: Mapping[str, Path] | Path,
    profile: str,
    params: Mapping[str, Any],
    on_progress: ProgressCallback | None,
    *,
    filename: str | None = None,
    callback_url: str | None = None,
    sha256: str | Mapping[str, str] | None = None,
) -> RemoteJob:
    """L{Client.submit}."""
    query: dict[str, Any] = {"profile": profile}
    query.update(params)
    if callback_url is not None:
        query["callback_url"] = callback_url
    if isinstance(sha256, str):
        query["sha256"] = sha256
    elif sha256 is not None:
        query.update({f"sha256.{name}": digest for name, digest in sha256.items()})
    watchdog: list[Watchdog] = []
    draining: list[Any] = []

    def progress(sent: int, total: int) -> None:
        # While the body goes: idle_timeout between chunks.
        watchdog[0].feed(client._idle_timeout, "sent")
        if sent == total:
            drain(None)
        if on_progress is not None:
            on_progress(sent, total)

    def drain(before: int | None) -> None:
        # All of the body is written, but on a slow link megabytes of it
        # may still wait in the socket's buffers: the upload still moves
        # (idle_timeout) while they go, and request_timeout for the
        # answer starts once they have gone.
        draining.clear()
        unsent = body.unsent()
        if unsent is None or unsent <= 0:
            watchdog[0].feed(client._request_timeout, "answer")
            return
        if before is None or unsent < before:
            watchdog[0].feed(client._idle_timeout, "sent")
            before = unsent
        period = min(1.0, client._idle_timeout / 4)
        draining.append(client._reactor.callLater(period, drain, before))

    parts: dict[str, FilePart]
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        body, part = StreamingBody.raw(path, client._cooperator, progress)
        query["filename"] = path.name if filename is None else filename
        parts = {"": part}
        method, ctype = "PUT", b"application/octet-stream"
    else:
        if not inputs:
            raise ValueError("no inputs")
        if filename is not None:
            # Each part is named after its file; filename= names a raw body.
            raise ValueError("filename= goes with one Path; rename the files of a mapping")
        body, ctype, parts = StreamingBody.multipart(
            {k: Path(v) for k, v in inputs.items()}, client._cooperator, progress
        )
        method = "POST"
    # No overall limit, which would cut a long upload short: the watchdog
    # ends one that stops moving, or whose answer does not come.
    url = client._url("/jobs", query)
    sending = Deferred.fromCoroutine(
        client._json_now(method, "/jobs", query, headers={b"Content-Type": ctype}, body=body)
    )
    watchdog.append(Watchdog(client._reactor, sending, client._idle_timeout, "sent"))
    try:
        data = await sending
    except CancelledError:
        body.stopProducing()
        expired = watchdog[0].expired
        if expired is None:
            raise
        seconds, what = expired
        if what == "sent":
            raise NoAnswer(method, url, f"the upload made no progress for {seconds:g} s") from None
        raise NoAnswer(method, url, f"no answer {seconds:g} s after the upload") from None
    except BaseException:
        # An answer that came before the whole body (a refusal) ends the upload.
        body.stopProducing()
        raise
    finally:
        watchdog[0].stop()
        for call in draining:
            if call.active():
                call.cancel()
    job = RemoteJob.from_json(data)
    await _check_digests(client, job, parts)
    return job


async def _check_digests(client: Client, job: RemoteJob, parts: Mapping[str, FilePart]) -> None:
    stored = {i.get("name"): i.get("sha256") for i in job.inputs}
    for name, part in parts.items():
        theirs = stored.get(name) if name else next(iter(stored.values()), None)
        if theirs is not None and part.sha256 is not None and theirs != part.sha256:
            try:
                await client.cancel(job.id)
            except Exception:
                pass  # The mismatch is what to report.
            raise TranscoderError(
                0,
                "digest_mismatch",
                f"the server stored {part.path.name} with SHA-256 {theirs}, "
                f"but {part.sha256} was sent; job {job.id} cancelled",
            )

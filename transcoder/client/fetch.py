"""
Saving a result (or one output) to disk: streamed to C{<path>.part}, resumed
with C{Range} after a dropped or stalled connection, checked against its
SHA-256, then renamed into place.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from transcoder.client.bodies import ProgressCallback
from transcoder.client.errors import TranscoderError
from transcoder.client.retry import Streak, retryable
from transcoder.client.sink import Sink

if TYPE_CHECKING:
    from transcoder.client.api import Client


async def fetch(
    client: Client,
    result: str,
    expected: str | None,
    path: Path,
    on_progress: ProgressCallback | None,
    retries: int,
    overwrite: bool = True,
) -> Path:
    """Save C{result} (a path on the server) to C{path}, as L{Client.download} describes."""
    partial = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    have = 0
    if partial.exists():
        with partial.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                have += len(chunk)
    # A .part this call did not write may be of another file altogether.
    old_part = have > 0
    etag: bytes | None = None
    streak = Streak(client._reactor, retries, client._retry_for)
    while True:
        headers: dict[bytes, bytes] = {}
        if have:
            headers[b"Range"] = b"bytes=%d-" % have
            if etag is not None:
                headers[b"If-Range"] = etag
        try:
            response = await client._limit(
                Deferred.fromCoroutine(
                    client._request("GET", result, headers=headers, unbuffered=True)
                ),
                client._request_timeout,
                f"GET {result}",
            )
        except Exception as e:
            if isinstance(e, TranscoderError) and e.status == 416 and have:
                # Everything is here already (or the .part is not of this file:
                # the digest check below tells).
                break
            pause = streak.failed() if retryable(e) else None
            if pause is None:
                raise
            await deferLater(client._reactor, pause, lambda: None)
            continue
        etag = header(response, b"etag") or etag
        if response.code == 200:
            # A full answer: the server ignored the range, or the file changed.
            digest, have = hashlib.sha256(), 0
            mode = "wb"
            total = response.length if isinstance(response.length, int) else None
        else:
            mode = "ab"
            total = _range_total(header(response, b"content-range"))
        received = have

        def count(n: int, total: int | None = total) -> None:
            nonlocal received
            received += n
            if on_progress is not None:
                on_progress(received, total if total is not None else -1)

        with partial.open(mode) as out:
            sink = Sink(client._reactor, out, digest, count, client._idle_timeout)
            response.deliverBody(sink)
            try:
                await sink.done
                ended = True
            except (ResponseFailed, PotentialDataLoss):
                ended = False
        made_progress = received > have
        have = received
        if ended:
            break
        if made_progress:
            # Resume at once: the connection broke, the server is there.
            streak.reset()
            continue
        pause = streak.failed()
        if pause is None:
            raise TranscoderError(0, "download_failed", f"the download of {result} kept failing")
        await deferLater(client._reactor, pause, lambda: None)
    if expected is not None and digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        if old_part:
            # Once more from the start, with nothing of the old .part.
            return await fetch(client, result, expected, path, on_progress, retries, overwrite)
        raise TranscoderError(
            0, "digest_mismatch", f"the result's SHA-256 is not {expected}; removed the copy"
        )
    put_in_place(partial, path, overwrite)
    return path


def put_in_place(partial: Path, path: Path, overwrite: bool) -> None:
    """
    Rename the complete C{partial} to C{path}.  Without C{overwrite}, a file
    at C{path} (even one made while the download ran) is never replaced:
    L{FileExistsError}, and C{partial} removed.
    """
    if overwrite:
        os.replace(partial, path)
        return
    try:
        # A hard link is made only if nothing has the name: the check and the
        # rename in one step, where exists() then replace() would race.
        os.link(partial, path)
    except FileExistsError:
        partial.unlink(missing_ok=True)
        raise
    partial.unlink()


def header(response: IResponse, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def _range_total(content_range: bytes | None) -> int | None:
    """C{bytes 100-199/200} -> 200."""
    if content_range is None or b"/" not in content_range:
        return None
    total = content_range.rsplit(b"/", 1)[1].strip()
    return int(total) if total.isdigit() else None

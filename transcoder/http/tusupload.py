"""
What the tus resources share: the store of upload records, the per-upload
lock, the SHA-256 state of uploads in progress, the checks of a new upload's
metadata (the same as a plain upload's), and the step that makes a finished
upload a job (the same as a plain upload's: L{transcoder.core.submit}).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.errors import DomainError
from transcoder.core.files import remove
from transcoder.core.profiles import Profile, ProfileError, profile_for
from transcoder.core.registry import JobRegistry
from transcoder.core.uploads import (
    IUploadLock,
    IUploadLocks,
    IUploadStore,
    Upload,
    UploadLocked,
    is_upload_id,
)
from transcoder.http.errors import APIError, http_error
from transcoder.http.fields import check_callback, input_digests, split_fields
from transcoder.http.names import extension, sanitise_filename
from transcoder.http.tusfinish import TusFinisher, job_id_for
from transcoder.http.tusproto import new_hash, tus_error, with_tus

log = Logger()

# Keys of Upload-Metadata that are not profile parameters.
CONTROL_KEYS = frozenset({"profile", "filename", "filetype", "callback_url", "sha256", "input"})
_ROLE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
# Terminated and expired ids remembered to answer 410 rather than 404.
_GONE_KEPT = 10_000
UploadEvent = Callable[[str, int], None]


@dataclass
class Prepared:
    """An upload held by one PATCH, ready for its bytes."""

    upload: Upload
    lock: IUploadLock
    path: Path
    offset: int
    sha: Any
    sha_before: Any
    checksum: tuple[str, bytes] | None = None
    checksum_hash: Any = None
    stop_request: Callable[[], None] = field(default=lambda: None)
    # The offset on record for this PATCH's own writes to be compared with
    # (see IUploadStore.update_offset): where it started, then its last checkpoint.
    recorded: int = 0
    # Counted in the PATCHes-in-flight gauge (a PATCH with a body), to be uncounted once.
    in_flight: bool = False


def _hash_file(path: Path, nbytes: int) -> Any:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        left = nbytes
        while left > 0:
            data = f.read(min(left, 1 << 20))
            if not data:
                raise OSError(f"{path} is shorter than its recorded offset")
            sha.update(data)
            left -= len(data)
    return sha


def _settle(path: Path, size: int) -> None:
    # The allocation ran a step ahead of the bytes: the file ends where they do.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trim(path: Path, size: int) -> None:
    # Only once the offset is recorded: a PATCH that lost the upload to another
    # node must not cut off the bytes that node wrote past its own end.  Not
    # synced: a longer file than the offset is harmless (the next PATCH writes
    # from the offset, the last one ends the file).
    try:
        os.truncate(path, size)
    except OSError as e:
        log.warn("could not trim {path}: {error}", path=str(path), error=e)


def superseded(upload: Upload | None = None) -> APIError:
    """The answer to a PATCH whose offset could not be recorded: another request moved it on."""
    return tus_error(
        409,
        "superseded",
        "another request took over this upload; HEAD it for its offset",
        **({"Upload-Offset": str(upload.offset)} if upload is not None else {}),
    )


class TusUploads:
    """See the module docstring.  Reactor thread only."""

    def __init__(
        self,
        reactor: Any,
        registry: JobRegistry,
        profiles: Mapping[str, Profile],
        store: IUploadStore,
        locks: IUploadLocks,
        data_dir: Path,
        max_size: int,
        expiry: float,
        *,
        check_disk: Callable[[int | None], None] = lambda n: None,
        event: UploadEvent = lambda what, n: None,
    ) -> None:
        """
        @param event: told C{("created"|"finished"|"terminated"|"expired", 0)},
            C{("bytes", n)} and C{("patches", +1|-1)}, for the metrics.
        """
        self.reactor = reactor
        self.registry = registry
        self.profiles = profiles
        self.store = store
        self.locks = locks
        self.dir = Path(data_dir) / "tus"
        self.max_size = max_size
        self.expiry = expiry
        self.check_disk = check_disk
        self.event = event
        self._hashes: dict[str, tuple[int, Any]] = {}
        # PATCHes ending (their files synced, their offsets recorded), waited
        # for by stop(): a SIGTERM just after a client went must not lose them.
        self._ending: set[Deferred[Any]] = set()
        self.gone: OrderedDict[str, None] = OrderedDict()
        # Counts the jobs made, as plain uploads' are (set by build_root).
        self.report: Callable[[str, int], None] = lambda outcome, nbytes: None
        # Every minute, or sooner for a short expiry, as the sweeper.
        self.finisher = TusFinisher(self, interval=max(1.0, min(60.0, expiry / 4)))

    def start(self) -> None:
        """Finish what a crash or a refusal left unfinished, now and from time to time."""
        self.finisher.start()

    def stop(self) -> Deferred[None]:
        """Stop reconciling; fires once every PATCH that is ending has recorded its offset."""
        self.finisher.stop()
        ending = list(self._ending)
        if ending:
            log.info("shutting down: recording the offsets of {n} PATCHes", n=len(ending))
        return DeferredList(ending, consumeErrors=True).addCallback(lambda _: None)

    def ending(self, d: Deferred[Any]) -> None:
        """A PATCH is ending in C{d}: the service's stop waits for it."""
        self._ending.add(d)

        def done(result: object) -> object:
            self._ending.discard(d)
            return result

        d.addBoth(done)

    def now(self) -> float:
        return float(self.reactor.seconds()) if hasattr(self.reactor, "seconds") else time.time()

    def forget(self, upload_id: str) -> None:
        """The upload is terminated or expired: its id answers 410 from now on."""
        self._hashes.pop(upload_id, None)
        self.gone[upload_id] = None
        while len(self.gone) > _GONE_KEPT:
            self.gone.popitem(last=False)

    def upload_dir(self, upload_id: str) -> Path:
        return self.dir / upload_id

    # Creation.

    def check_metadata(self, metadata: dict[str, str]) -> dict[str, Any]:
        """
        The checks a plain upload's fields get, before any byte: unknown
        profile or bad parameter 422, bad digest 400.  Returns what the
        record keeps: the role, the file's name, the parameters.
        """
        fields = {k: v for k, v in metadata.items() if k not in ("filetype", "input")}
        control, raw_params = split_fields(fields)
        role = metadata.get("input") or None
        name = metadata.get("profile")
        if role is not None and (len(role) > 32 or not set(role) <= _ROLE_CHARS):
            raise tus_error(422, "bad_input", "input must be a short lower-case name (a role)")
        filename = sanitise_filename(control.get("filename"), default="input")
        if not name and role is not None:
            # An input of a multi-input job, put together later by POST /jobs.
            if raw_params or control.get("callback_url"):
                raise tus_error(
                    422,
                    "missing_profile",
                    "parameters and callback_url go with the profile, in POST /jobs",
                )
            sha = control.get("sha256")
            if sha is not None:
                try:
                    sha = input_digests({"sha256": sha}, _OneInput(role))[role]  # type: ignore[arg-type]
                except APIError as e:
                    raise with_tus(e) from None
            return {"role": role, "display": filename, "raw_params": {}, "sha256_expected": sha}
        try:
            profile = profile_for(self.profiles, name)
            params = profile.validate_params(raw_params)
            callback = check_callback(control.get("callback_url"))
            if len(profile.inputs) != 1:
                raise tus_error(
                    422,
                    "needs_inputs",
                    f"profile {profile.name} takes several inputs ({', '.join(profile.inputs)}): "
                    "upload each with input=<role> and no profile, then POST /jobs with "
                    "profile and upload.<role>=<upload id>",
                )
            if role is not None and role != profile.inputs[0]:
                raise tus_error(
                    422, "bad_input", f"profile {profile.name} has no input {role[:32]!r}"
                )
            digests = input_digests(control, profile)
        except APIError as e:
            raise with_tus(e) from None
        except DomainError as e:
            raise with_tus(http_error(e)) from None
        del params  # checked; validated again when the job is made
        return {
            "role": profile.inputs[0],
            "display": filename,
            "raw_params": raw_params,
            "callback_url": callback,
            "sha256_expected": digests.get(profile.inputs[0]),
        }

    def admit(self, length: int | None) -> None:
        """The server's own limits, after the request's: 503 queue full, 507 disk short."""
        try:
            self.registry.check_capacity()
            self.check_disk(length)
        except APIError as e:
            raise with_tus(e) from None
        except DomainError as e:
            raise with_tus(http_error(e)) from None

    # PATCH.

    def prepare(
        self,
        upload_id: str,
        owner: str | None,
        offset: int,
        nbytes: int,
        length: int | None,
        checksum: tuple[str, bytes] | None,
    ) -> Deferred[Prepared]:
        """
        Take the upload for one PATCH: its lock (asking a PATCH in flight to
        stop), its record (404, 410, 409 for a wrong offset, 413 past its
        length) and the SHA-256 of what is on disk.
        """
        if not is_upload_id(upload_id):
            return fail(tus_error(404, "not_found", "no such upload"))
        box: list[Prepared] = []

        def stop() -> None:
            if box:
                box[0].stop_request()

        return (
            self.locks.acquire(upload_id, stop)
            .addErrback(self._locked)
            .addCallback(self._held, owner, offset, nbytes, length, checksum, box)
        )

    def _locked(self, f: Failure) -> Failure:
        if f.check(UploadLocked):
            message = "another request is writing to this upload; try again"
            return Failure(tus_error(423, "locked", message, Retry_After="5"))
        return f

    def lookup(self, upload_id: str, owner: str | None) -> Deferred[Upload]:
        """The upload, or 404 (none, or another token's), 410 (expired, terminated)."""
        if not is_upload_id(upload_id):
            return fail(tus_error(404, "not_found", "no such upload"))

        def found(upload: Upload | None) -> Upload:
            if upload is None:
                if upload_id in self.gone:
                    raise tus_error(410, "gone", "the upload expired or was terminated")
                raise tus_error(404, "not_found", "no such upload")
            if upload.owner != owner:
                raise tus_error(404, "not_found", "no such upload")
            return upload

        return self.store.get(upload_id).addCallback(found)

    def _held(
        self,
        lock: IUploadLock,
        owner: str | None,
        offset: int,
        nbytes: int,
        length: int | None,
        checksum: tuple[str, bytes] | None,
        box: list[Prepared],
    ) -> Deferred[Prepared]:
        upload_id: str = lock.upload_id

        async def take() -> Prepared:
            upload = await self.lookup(upload_id, owner)
            if upload.length is None and length is not None:
                if length == 0:
                    # As for POST /uploads with Upload-Length: 0 and a plain upload.
                    raise tus_error(400, "empty_body", "the upload is empty")
                if length > self.max_size:
                    raise tus_error(413, "too_large", "Upload-Length is past the maximum size")
                if length < upload.offset:
                    raise tus_error(
                        400,
                        "bad_length",
                        f"Upload-Length {length} is below the {upload.offset} bytes received",
                        Upload_Offset=str(upload.offset),
                    )
                await self.store.set_length(upload_id, length)
                upload.length = length
            if offset != upload.offset and upload.complete and upload.job_id is None:
                # The last PATCH again, after its job was refused: try again.
                await self.retry_complete(upload)
            if offset != upload.offset:
                raise tus_error(
                    409,
                    "offset_mismatch",
                    f"Upload-Offset is {offset}, the upload is at {upload.offset}",
                    Upload_Offset=str(upload.offset),
                    # A client retrying the last PATCH learns of the job it made.
                    **({"Job_Location": f"/jobs/{upload.job_id}"} if upload.job_id else {}),
                )
            if nbytes and upload.complete:
                # Checked before the 413 below, which any byte on a complete upload would
                # also hit: the client is told the upload is done, not that it is too long.
                raise tus_error(403, "finished", "the upload is complete")
            end = upload.length if upload.length is not None else self.max_size
            if nbytes > end - upload.offset:
                raise tus_error(413, "too_large", "the body goes past the upload's length")
            sha = await self._sha(upload)
            prep = Prepared(upload, lock, self.upload_dir(upload_id) / upload.filename,
                            upload.offset, sha, sha.copy(), recorded=upload.offset)  # fmt: skip
            if checksum is not None:
                prep.checksum = checksum
                prep.checksum_hash = new_hash(checksum[0])
            box.append(prep)
            if nbytes:
                prep.in_flight = True
                self.event("patches", 1)
            return prep

        def failed(f: Failure) -> Failure:
            lock.release()
            return f

        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(take()).addErrback(failed)

    def _sha(self, upload: Upload) -> Deferred[Any]:
        """The SHA-256 of the upload's bytes so far: kept from its last PATCH, or hashed again."""
        cached = self._hashes.pop(upload.id, None)
        if cached is not None and cached[0] == upload.offset:
            return succeed(cached[1])
        if upload.job_id is not None or upload.offset == 0:
            return succeed(hashlib.sha256())
        path = self.upload_dir(upload.id) / upload.filename
        log.info("upload {id}: hashing its {n} bytes on disk again", id=upload.id, n=upload.offset)
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _hash_file, path, upload.offset
        )

    def file_digest(self, upload: Upload) -> Deferred[str]:
        """
        The SHA-256 of a complete upload's file: as its last PATCH found it,
        or (the record keeps no digest: after a restart) hashed again.
        """
        known = upload.extra.get("sha256")
        if known:
            return succeed(str(known))
        path = self.upload_dir(upload.id) / upload.filename
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _hash_file, path, upload.offset
        )

        def hashed(sha: Any) -> str:
            digest: str = sha.hexdigest()
            upload.extra["sha256"] = digest
            return digest

        return d.addCallback(hashed)

    def release(self, prep: Prepared, sha: Any) -> None:
        """The PATCH lets go of the upload; C{sha}, if given, is its hash at C{prep.offset}."""
        if prep.in_flight:
            prep.in_flight = False
            self.event("patches", -1)
        if sha is not None:
            self._hashes[prep.upload.id] = (prep.offset, sha)
        prep.lock.release()

    def patched(self, prep: Prepared, end: int, complete: bool, trusted: bool) -> Deferred[Upload]:
        """
        The PATCH's bytes are written up to C{end}: check its checksum (460,
        the chunk dropped), make them durable, record the offset, and make
        the job if the upload is complete.  Releases the lock.
        """
        upload = prep.upload
        if upload.job_id is not None:
            # An empty PATCH at the end of a finished upload (its file is the
            # job's now, or waits for POST /jobs): answered as the last one was.
            return self._after(prep, succeed(upload), None, 0)
        if prep.checksum is not None and (
            not complete or prep.checksum_hash.digest() != prep.checksum[1]
        ):
            d = deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _settle, prep.path, prep.offset
            )

            def mismatch(_: object) -> Upload:
                raise tus_error(460, "checksum_mismatch", "Upload-Checksum does not match")

            return self._after(prep, d.addCallback(mismatch), prep.sha_before, nbytes=0)
        written = end - prep.offset

        async def record() -> Upload:
            pool = self.reactor.getThreadPool()
            await deferToThreadPool(self.reactor, pool, _sync, prep.path)
            if not await self.store.update_offset(
                upload.id, prep.recorded, end, self.now() + self.expiry
            ):
                raise superseded(await self.store.get(upload.id))
            prep.recorded = upload.offset = end
            await deferToThreadPool(self.reactor, pool, _trim, prep.path, end)
            if upload.complete and upload.job_id is None:
                await self._complete(upload, prep.sha)
            return upload

        from twisted.internet.defer import ensureDeferred

        sha = prep.sha if trusted else None
        return self._after(prep, ensureDeferred(record()), sha, written, end)

    def _after(
        self,
        prep: Prepared,
        d: Deferred[Upload],
        sha: Any,
        nbytes: int,
        end: int | None = None,
    ) -> Deferred[Upload]:
        def settled(result: Upload | Failure) -> Upload | Failure:
            if end is not None:
                prep.offset = end
            self.event("bytes", nbytes)
            self.release(prep, sha if prep.upload.job_id is None else None)
            return result

        return d.addBoth(settled)

    def checkpoint(self, prep: Prepared, size: int) -> Deferred[None]:
        """
        A long PATCH's bytes up to C{size} are durably in the file (synced by
        the spool): record them, so that a crash loses at most what came
        since.  Fails with L{superseded} when another request moved the upload on.
        """

        def lost(upload: Upload | None) -> None:
            raise superseded(upload)

        def recorded(ok: bool) -> Deferred[None] | None:
            if not ok:
                return self.store.get(prep.upload.id).addCallback(lost)
            prep.recorded = size
            return None

        return self.store.update_offset(
            prep.upload.id, prep.recorded, size, self.now() + self.expiry
        ).addCallback(recorded)

    def discard(self, prep: Prepared) -> None:
        """A write failed: the file goes back to the offset on record, as does the hash."""
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _settle, prep.path, prep.recorded
        )
        self._after(prep, d.addCallback(lambda _: prep.upload), prep.sha_before, 0).addErrback(
            lambda f: log.failure("could not truncate {path}", f, path=str(prep.path))
        )

    # The job.

    async def _complete(self, upload: Upload, sha: Any) -> None:
        """
        The upload's last byte is in: it becomes a job as a plain upload
        does, or (an input uploaded without a profile) waits for C{POST /jobs}.
        """
        digest = sha.hexdigest()
        upload.extra["sha256"] = digest
        want = upload.extra.get("sha256_expected")
        if want is not None and want != digest:
            # Gone before the client hears of it (and before the lock goes):
            # a HEAD then finds no complete upload to make a job of.
            await self.terminate_now(upload)
            raise tus_error(400, "digest_mismatch", "the upload's SHA-256 does not match")
        profile_name = upload.metadata.get("profile")
        if not profile_name:
            upload.job_id = await self.store.finish(upload.id, "")
            self.event("finished", 0)
            return
        await self.finisher.make(upload, digest)

    async def retry_complete(self, upload: Upload) -> None:
        """
        A complete upload without a job on record (refused before, or a crash
        came between): make it now, its lock held.  Fails as the PATCH that
        completed it would (503 or 507, the offset kept).
        """
        if upload.metadata.get("profile") and self.registry.get(job_id_for(upload.id)):
            # Made already: only the record is missing; the file is not needed.
            await self.finisher.make(upload, "")
            return
        await self._complete(upload, await self._sha(upload))

    def terminate_now(self, upload: Upload) -> Deferred[None]:
        remove(self.upload_dir(upload.id))
        self.forget(upload.id)
        return self.store.terminate(upload.id)

    def new_file(self, upload_id: str, role: str, filename: str) -> str:
        """Create the upload's directory and empty file; its name in the directory."""
        name = f"input-{role}{extension(filename)}"
        d = self.upload_dir(upload_id)
        d.mkdir(parents=True)
        try:
            (d / name).touch(exist_ok=False)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return name


class _OneInput:
    """Stands for a profile of one input, to check a C{sha256} against."""

    def __init__(self, role: str) -> None:
        self.inputs = [role]
        self.name = "(none)"


__all__ = ["Prepared", "ProfileError", "TusUploads"]

"""
Making the job of a complete resumable upload so that no fault loses the
upload or makes a second job:

- the job's id is derived from the upload's (L{job_id_for}): every attempt
  names the same job, and the registry says whether it exists already;
- the upload's file is hard-linked into the job's staging directory, and
  stays in C{tus/<upload id>/} until the upload's record names the job.  A
  job the registry refuses (the store failing, shutting down) takes only the
  link with it: the upload stays complete, its offset its length, and the
  client is answered 503 (or 507) with C{Retry-After};
- an upload complete without a job on record is finished again by a HEAD, a
  retried last PATCH, and every pass of L{TusFinisher.reconcile} (the first
  at start-up): if its job exists (a crash between storing the job and
  recording it in the upload) the record is completed, else the job is
  submitted again from the file.

Inputs of a multi-input job (L{transcoder.http.tusjobs}) are linked the same
way and marked used only once their job is stored; the job names them in its
C{extra} (L{UPLOADS_KEY}), which is how a pass finds a job whose inputs a
crash left unmarked.
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.errors import DomainError
from transcoder.core.files import remove
from transcoder.core.jobs import InputFile
from transcoder.core.profiles import profile_for
from transcoder.core.submit import UPLOADS_KEY, Submission, submit
from transcoder.core.uploads import Upload, is_upload_id
from transcoder.http.errors import APIError, http_error
from transcoder.http.tusproto import tus_error, with_tus

if TYPE_CHECKING:
    from transcoder.http.tusupload import TusUploads

log = Logger()

# Seconds a client is told to wait when the job could not be made.
RETRY_AFTER = 30


def job_id_for(*upload_ids: str) -> str:
    """The id of the job made from these uploads: the same on every attempt, on every node."""
    key = "\n".join(sorted(upload_ids)).encode("ascii")
    return hashlib.sha256(b"transcoder tus job\n" + key).hexdigest()[:32]


def refusal(f: Failure, upload: Upload) -> APIError:
    """
    The answer to a finished upload whose job the registry refused: its own
    status when it gave one (503 shutting_down, store_unavailable), 507 for a
    full disk, else 503; always with C{Retry-After} and the offset kept.
    """
    headers = {"Upload-Offset": str(upload.offset)}
    if isinstance(f.value, DomainError):
        error = http_error(f.value)
        if error.status < 500:
            return with_tus(error)
    elif isinstance(f.value, OSError) and f.value.errno in (errno.ENOSPC, errno.EDQUOT):
        error = APIError(
            507, "insufficient_storage", "the server is short of disk space; try again later"
        )
    else:
        error = APIError(
            503, "store_unavailable", "the server cannot record new jobs right now; try again later"
        )
    retry = error.headers.get("Retry-After", str(RETRY_AFTER))
    message = f"{error.message} (the upload is complete and kept: HEAD it again later)"
    return tus_error(error.status, error.code, message, Retry_After=retry, **headers)


class TusFinisher:
    """See the module docstring.  Reactor thread only."""

    def __init__(self, uploads: TusUploads, interval: float = 60.0) -> None:
        self._uploads = uploads
        self._interval = interval
        self._loop: LoopingCall | None = None

    def make(self, upload: Upload, digest: str) -> Deferred[str]:
        """
        Make the job of C{upload}, complete and checked, its lock held; fires
        with the job's id once the record names it.  Fails with L{refusal}
        when the registry does not take the job.
        """
        return ensureDeferred(self._make(upload, digest))

    async def _make(self, upload: Upload, digest: str) -> str:
        uploads = self._uploads
        registry = uploads.registry
        job_id = job_id_for(upload.id)
        if registry.get(job_id) is None:
            profile = profile_for(uploads.profiles, upload.metadata.get("profile"))
            params = profile.validate_params(upload.extra.get("raw_params", {}))
            staging = registry.uploads_dir / job_id
            # What an earlier refused attempt may have left.
            remove(staging)
            staging.mkdir(parents=True)
            source = uploads.upload_dir(upload.id) / upload.filename
            os.link(source, staging / upload.filename)
            display = upload.extra["display"]
            submission = Submission(
                job_id=job_id,
                staging=staging,
                profile=profile,
                params=params,
                inputs=[
                    InputFile(upload.extra["role"], display, upload.offset, digest, upload.filename)
                ],
                callback_url=upload.extra.get("callback_url"),
                base_url=upload.extra.get("base_url"),
                extra={UPLOADS_KEY: [upload.id]},
            )
            try:
                await submit(registry, submission, upload.owner)
            except Exception:
                f = Failure()
                remove(staging)
                log.warn(
                    "upload {id}: its job was refused ({error}); the upload is kept",
                    id=upload.id,
                    error=f.getErrorMessage(),
                )
                raise refusal(f, upload) from None
        try:
            recorded: str = await uploads.store.finish(upload.id, job_id)
        except Exception:
            # The job exists: the client is told of it.  The files stay, so
            # that a later pass finds the upload and completes its record.
            log.failure("upload {id}: could not record its job {job}", id=upload.id, job=job_id)
            upload.job_id = job_id
            return job_id
        upload.job_id = recorded
        remove(uploads.upload_dir(upload.id))
        uploads.event("finished", 0)
        # Counted as a plain upload's job is; its bytes were counted by the
        # PATCHes that brought them (transcoder_tus_bytes).
        uploads.report("created", 0)
        return recorded

    def marked_used(self, upload: Upload, job_id: str) -> Deferred[None]:
        """An input of a multi-input job whose job is stored: record it, its file goes."""

        async def mark() -> None:
            upload.job_id = await self._uploads.store.finish(upload.id, job_id)
            remove(self._uploads.upload_dir(upload.id))

        return ensureDeferred(mark())

    # The passes.

    def start(self) -> None:
        """Reconcile now (start-up: a crash may have left work), then every C{interval}."""
        self._loop = LoopingCall(self.reconcile)
        self._loop.clock = self._uploads.reactor
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("reconciling uploads stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def reconcile(self) -> Deferred[None]:
        """
        One pass over the uploads whose files are still in C{tus/}: complete
        ones without a job get it (or their record the job a crash left
        unrecorded); finished ones lose the files a crash left behind.
        Uploads a request holds are left to it.
        """
        return ensureDeferred(self._reconcile())

    async def _reconcile(self) -> None:
        uploads = self._uploads
        used: dict[str, str] | None = None
        try:
            entries = sorted(uploads.dir.iterdir()) if uploads.dir.is_dir() else []
        except OSError:
            log.failure("reconciling uploads: cannot list {dir}", dir=str(uploads.dir))
            return
        for entry in entries:
            upload_id = entry.name
            if not is_upload_id(upload_id) or uploads.locks.held(upload_id):
                continue
            # One upload's failure (the store down a moment) is logged; the
            # pass goes on, and so do the next ones.
            try:
                upload = await uploads.store.get(upload_id)
                if upload is None or not upload.complete:
                    continue
                if upload.job_id == "" and used is None:
                    used = {
                        u: job.id
                        for job in uploads.registry.jobs()
                        if len(job.extra.get(UPLOADS_KEY) or ()) > 1
                        for u in job.extra[UPLOADS_KEY]
                    }
                if upload.job_id == "" and (used is None or upload_id not in used):
                    continue  # an input waiting for its POST /jobs
                # Never asks a holder to stop: a request on another node may be
                # making this very job (its last PATCH, a HEAD).
                lock = await uploads.locks.try_acquire(upload_id)
                if lock is None:
                    continue
                try:
                    await self._settle(upload_id, used or {})
                finally:
                    lock.release()
            except Exception:
                log.failure("reconciling upload {id} failed", id=upload_id)

    async def _settle(self, upload_id: str, used: dict[str, str]) -> None:
        uploads = self._uploads
        upload = await uploads.store.get(upload_id)
        if upload is None or not upload.complete:
            return
        if upload.job_id:
            log.info("upload {id}: removing the files its job {job} left", id=upload_id,
                     job=upload.job_id)  # fmt: skip
            remove(uploads.upload_dir(upload_id))
        elif upload.job_id == "":
            job_id = used[upload_id]
            log.info("upload {id}: recording that job {job} used it", id=upload_id, job=job_id)
            await self.marked_used(upload, job_id)
        else:
            log.info("upload {id}: complete without a job: making it", id=upload_id)
            try:
                await uploads.retry_complete(upload)
            except APIError as e:
                log.info("upload {id}: not yet: {error}", id=upload_id, error=e.message)


__all__ = ["RETRY_AFTER", "TusFinisher", "job_id_for", "refusal"]

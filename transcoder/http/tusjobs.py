"""
A job of several inputs from finished tus uploads: each input is uploaded
with C{input=<role>} and no profile (it waits, complete, for a job), then
C{POST /jobs?profile=mux-avi&upload.video=<id>&upload.audio=<id>} (no body)
makes the job from them, checked as a multipart upload's fields are.

The inputs are hard-linked into the job's staging directory and held (their
locks) until the job is stored; only then are they marked used and their
files removed.  A job the registry refuses leaves them as they were, ready
for the same request again.  The job's id comes from the uploads' ids
(L{job_id_for}): a request repeated after a crash between storing the job
and marking its inputs finds the job, and marks them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from transcoder.core.files import remove
from transcoder.core.jobs import InputFile, Job
from transcoder.core.profiles import profile_for
from transcoder.core.submit import UPLOADS_KEY, Submission
from transcoder.core.uploads import IUploadLock, Upload, is_upload_id
from transcoder.http.bodies import IRequestBody
from transcoder.http.errors import APIError
from transcoder.http.fields import check_callback, input_digests, query_fields, split_fields
from transcoder.http.names import extension
from transcoder.http.publicurl import request_base_url
from transcoder.http.tusfinish import job_id_for
from transcoder.http.tusupload import TusUploads

PREFIX = "upload."


def names_uploads(request: server.Request) -> bool:
    """Whether a C{POST /jobs} names finished uploads rather than bringing a body."""
    return any(k.startswith(PREFIX.encode()) for k in (request.args or {}))


@implementer(IRequestBody)
class FromUploads:
    """The (empty) body of a C{POST /jobs} that names uploads: its finish makes the submission."""

    def __init__(self, uploads: TusUploads, request: server.Request) -> None:
        fields = query_fields(request.args or {})
        self._named = {k[len(PREFIX) :]: v for k, v in fields.items() if k.startswith(PREFIX)}
        rest = {k: v for k, v in fields.items() if not k.startswith(PREFIX)}
        control, raw_params = split_fields(rest)
        self._profile = profile_for(uploads.profiles, control.get("profile"))
        self._params = self._profile.validate_params(raw_params)
        self._callback = check_callback(control.get("callback_url"))
        self._base_url = request_base_url(request) if self._callback else None
        if sorted(self._named) != sorted(self._profile.inputs):
            raise APIError(
                422,
                "missing_input",
                f"profile {self._profile.name} takes upload.<role> for "
                f"{', '.join(self._profile.inputs)}",
            )
        for role, upload_id in self._named.items():
            # Checked before any lock is taken: a lock's key is made from the id.
            if not is_upload_id(upload_id):
                raise APIError(404, "not_found", f"upload.{role}: no such upload")
        if len(set(self._named.values())) != len(self._named):
            # One upload cannot be two inputs (and would wait on its own lock).
            raise APIError(422, "bad_input", "the same upload is named for two inputs")
        self._digests = input_digests(control, self._profile)
        self._uploads = uploads
        self._owner: str | None = getattr(request, "owner", None)
        self._held: list[IUploadLock] = []
        self._found: dict[str, Upload] = {}
        uploads.admit(None)

    def dataReceived(self, data: bytes) -> None:
        raise APIError(400, "unexpected_body", "a job made from uploads takes no body")

    def abort(self) -> None:
        self._release()

    def _release(self) -> None:
        held, self._held = self._held, []
        for lock in held:
            lock.release()

    def finish(self) -> Deferred[Submission]:
        return ensureDeferred(self._submission())

    async def _submission(self) -> Submission:
        uploads = self._uploads
        try:
            found = self._found
            got: dict[str, Upload] = {}
            # In id order: two requests naming the same uploads in other orders would
            # otherwise each hold one and wait on the other's until both get 423.
            for role, upload_id in sorted(self._named.items(), key=lambda kv: kv[1]):
                lock = await uploads.locks.acquire(upload_id, lambda: None).addErrback(
                    uploads._locked
                )
                self._held.append(lock)
                try:
                    upload = await uploads.lookup(upload_id, self._owner)
                except APIError as e:
                    raise APIError(e.status, e.code, f"upload.{role}: {e.message}") from None
                if upload.metadata.get("input") != role or upload.metadata.get("profile"):
                    raise APIError(
                        422, "bad_input", f"upload.{role} was not uploaded with input={role}"
                    )
                if not upload.complete or upload.job_id is None:
                    raise APIError(409, "upload_incomplete", f"upload.{role} is not complete")
                if upload.job_id:
                    raise APIError(
                        409, "upload_used", f"upload.{role} made job {upload.job_id} already"
                    )
                got[role] = upload
            found.update((role, got[role]) for role in self._named)
            ids = [u.id for u in found.values()]
            job_id = job_id_for(*ids)
            if uploads.registry.get(job_id) is not None:
                # Stored, then a crash before its inputs were marked: mark them now.
                for upload in found.values():
                    await uploads.finisher.marked_used(upload, job_id)
                raise APIError(409, "upload_used", f"these uploads made job {job_id} already")
            digests: dict[str, str] = {}
            for role, upload in found.items():
                digests[role] = await uploads.file_digest(upload)
                want = self._digests.get(role)
                if want is not None and want != digests[role]:
                    raise APIError(400, "digest_mismatch", f"the SHA-256 of {role} does not match")
            staging = uploads.registry.uploads_dir / job_id
            remove(staging)
            staging.mkdir(parents=True)
            inputs = []
            for role, upload in found.items():
                name = f"input-{role}{extension(upload.extra['display'])}"
                os.link(uploads.upload_dir(upload.id) / upload.filename, staging / name)
                inputs.append(
                    InputFile(role, upload.extra["display"], upload.offset, digests[role], name)
                )
            return Submission(
                job_id=job_id,
                staging=staging,
                profile=self._profile,
                params=self._params,
                inputs=inputs,
                callback_url=self._callback,
                base_url=self._base_url,
                extra={UPLOADS_KEY: ids},
                added=self._added,
                refused=lambda f: self._refused(f, staging),
            )
        except BaseException:
            self._release()
            raise

    def _added(self, job: Job) -> Deferred[None]:
        """The job is stored: now its inputs are used, their files gone."""

        async def mark() -> None:
            try:
                for upload in self._found.values():
                    await self._uploads.finisher.marked_used(upload, job.id)
            finally:
                self._release()

        return ensureDeferred(mark())

    def _refused(self, f: Failure, staging: Path) -> None:
        """No job: the links go; the uploads are as they were, free for another try."""
        remove(staging)
        self._release()


def from_uploads(uploads: TusUploads) -> Any:
    """The hook L{transcoder.http.jobs.JobsResource} calls for a body it is about to read."""

    def hook(request: server.Request) -> IRequestBody | None:
        return FromUploads(uploads, request) if names_uploads(request) else None

    return hook

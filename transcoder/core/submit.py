"""
Turning a complete upload into a job: the one way in for every kind of upload.

An upload is written under C{uploads/<job id>} while it arrives; once every
input is there and checked, its directory is renamed into C{jobs/<job id>}
(the same filesystem: no copy) and the job is stored and queued.

A resumable upload's staging directory holds hard links to its files, which
stay in C{tus/} until the job exists: a job the registry refuses (the store
failing, shutting down) loses the links only, and the upload can be made a
job again later.  C{added}/C{refused} tell such an upload how it went.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.core.jobs import InputFile, Job
from transcoder.core.profiles import ParamValue, Profile
from transcoder.core.registry import JobRegistry

# The key of Job.extra that holds the service's URL as the upload saw it.
BASE_URL_KEY = "base_url"
# The key of Job.extra that lists the resumable uploads the job was made from.
UPLOADS_KEY = "tus_uploads"

log = Logger()


@dataclass
class Submission:
    """A complete upload: everything needed to create its job."""

    job_id: str
    staging: Path
    profile: Profile
    params: dict[str, ParamValue]
    inputs: list[InputFile]
    callback_url: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    # The service's URL as the upload's Host header gave it: webhooks' URLs start with it.
    base_url: str | None = None
    # More of Job.extra (the resumable uploads a job was made from).
    extra: dict[str, Any] = field(default_factory=dict)
    # Told once the job is stored; a failure of its own is logged, the job
    # stands.  Its Deferred is waited for before submit's fires.
    added: Callable[[Job], Deferred[None] | None] | None = None
    # Told why the job was not made, its staging directory gone.
    refused: Callable[[Failure], None] | None = None


def submit(registry: JobRegistry, submission: Submission, owner: str | None) -> Deferred[Job]:
    """
    Move the upload's files into the job's directory and add the job.

    If the registry refuses it (shutting down, the store failing), the
    files are removed and the Deferred fails with the registry's reason.
    """
    job_dir = registry.job_dir(submission.job_id)
    try:
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(submission.staging, job_dir)
    except OSError:
        if submission.refused is not None:
            submission.refused(Failure())
        raise
    job = Job(
        id=submission.job_id,
        profile=submission.profile.name,
        params=submission.params,
        inputs=submission.inputs,
        owner=owner,
        callback_url=submission.callback_url,
        extra={
            **submission.extra,
            **({BASE_URL_KEY: submission.base_url} if submission.base_url else {}),
        },
    )

    def not_added(f: Failure) -> Failure:
        shutil.rmtree(job_dir, ignore_errors=True)
        if submission.refused is not None:
            submission.refused(f)
        return f

    def added(job: Job) -> Deferred[Job] | Job:
        hook = submission.added
        if hook is None:
            return job

        def failed(f: Failure) -> None:
            log.failure("job {job_id} is made; recording it elsewhere failed", f, job_id=job.id)

        return maybeDeferred(hook, job).addErrback(failed).addCallback(lambda _: job)

    return registry.add(job).addCallbacks(added, not_added)

"""
Turning a complete upload into a job: the one way in for every kind of upload.

An upload is written under C{uploads/<job id>} while it arrives; once every
input is there and checked, its directory is renamed into C{jobs/<job id>}
(the same filesystem: no copy) and the job is stored and queued.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from transcoder.core.jobs import InputFile, Job
from transcoder.core.profiles import ParamValue, Profile
from transcoder.core.registry import JobRegistry

# The key of Job.extra that holds the service's URL as the upload saw it.
BASE_URL_KEY = "base_url"


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


def submit(registry: JobRegistry, submission: Submission, owner: str | None) -> Deferred[Job]:
    """
    Move the upload's files into the job's directory and add the job.

    If the registry refuses it (shutting down, the store failing), the
    files are removed and the Deferred fails with the registry's reason.
    """
    job_dir = registry.job_dir(submission.job_id)
    job_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(submission.staging, job_dir)
    job = Job(
        id=submission.job_id,
        profile=submission.profile.name,
        params=submission.params,
        inputs=submission.inputs,
        owner=owner,
        callback_url=submission.callback_url,
        extra={BASE_URL_KEY: submission.base_url} if submission.base_url else {},
    )

    def not_added(f: Failure) -> Failure:
        shutil.rmtree(job_dir, ignore_errors=True)
        return f

    return registry.add(job).addErrback(not_added)

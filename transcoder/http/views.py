"""A job as the API shows it: its JSON, with the URLs a client follows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from transcoder.core.jobs import Job, JobState


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(job: Job, base_url: str = "") -> dict[str, Any]:
    """The public view of C{job}; its URLs start with C{base_url} (empty: relative)."""
    out: dict[str, Any] = {
        "id": job.id,
        "profile": job.profile,
        "params": job.params,
        "state": job.state.value,
        "progress": round(job.progress, 1),
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "inputs": [
            {
                "name": i.name,
                "filename": i.filename,
                "size": i.size,
                "sha256": i.sha256,
                # What the probe learnt of it: container, duration, streams.
                "media": i.media,
            }
            for i in job.inputs
        ],
        "output": None,
        "outputs": [],
        "error": None,
        # With several nodes: which ran (or runs) the job, and which run of it this is.
        "node": job.node,
        "attempt": job.attempt,
        "url": f"{base_url}/jobs/{job.id}",
    }
    if job.state is JobState.SUCCEEDED:
        out["outputs"] = [
            {
                "name": o.name,
                "size": o.size,
                "sha256": o.sha256,
                "media_type": o.media_type,
                "duration": o.duration,
                "url": f"{base_url}/jobs/{job.id}/outputs/{o.name}",
            }
            for o in job.result_files()
        ]
    if job.output is not None and job.state is JobState.SUCCEEDED:
        out["output"] = {
            "size": job.output.size,
            "sha256": job.output.sha256,
            "media_type": job.output.media_type,
            "duration": job.output.duration,
            "result_url": f"{base_url}/jobs/{job.id}/result",
        }
    if job.state is JobState.FAILED:
        out["error"] = {
            "message": job.error or "failed",
            "exit_code": job.exit_code,
            "log_tail": job.log_tail,
        }
    return out

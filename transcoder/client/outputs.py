"""
Saving every output of a job into a directory (C{transcoder download ID -o DIR}).

The names come from the server, so each is checked before it becomes a path:
relative, no C{..}, no empty or hidden level.  A server (or a proxy) that
named C{../../.bashrc} gets an error, not a file written outside the directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from transcoder.client.bodies import ProgressCallback
from transcoder.client.errors import TranscoderError

if TYPE_CHECKING:
    from transcoder.client.api import Client

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def safe_name(name: object) -> str:
    """C{name} if it is a safe relative output name, else L{TranscoderError}."""
    if not isinstance(name, str) or not all(
        _SEGMENT.match(part) and part != ".." for part in name.split("/")
    ):
        raise TranscoderError(0, "bad_response", f"refusing to save an output named {name!r}")
    return name


async def save_outputs(
    client: Client,
    job_id: str,
    directory: Path,
    on_progress: ProgressCallback | None,
    retries: int,
) -> list[Path]:
    job = await client.get(job_id)
    if job.state != "succeeded":
        raise TranscoderError(
            409, "not_ready", f"the job is {job.state}; it has no outputs to download"
        )
    outputs = job.data.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise TranscoderError(0, "bad_response", "the job lists no outputs")
    saved: list[Path] = []
    for output in outputs:
        name = safe_name(output.get("name") if isinstance(output, dict) else None)
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"/jobs/{quote(job_id, safe='')}/outputs/{quote(name, safe='/')}"
        saved.append(await client.fetch(url, output.get("sha256"), target, on_progress, retries))
    return saved

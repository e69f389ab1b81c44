"""
Removing the files of jobs and uploads.

A file that cannot be removed is logged and left: the job's record, not its
files, is what clients see, and the next start removes what no job owns.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from twisted.logger import Logger

_log = Logger()


def remove(path: Path) -> None:
    """Remove C{path}, a directory tree or a file; a failure is logged, never raised."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        _log.failure("could not remove {path}", path=str(path))


def empty_uploads(directory: Path) -> None:
    """Create C{directory}, or remove what it holds: uploads that never finished."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        _log.info("removing {path}: an upload that never finished", path=str(entry))
        remove(entry)


def remove_results(job_dir: Path) -> None:
    """Remove a job's results, finished or partial."""
    if job_dir.is_dir():
        # outputs[.<attempt>]/: a multi-output profile's directory.
        for result in [*job_dir.glob("result.*"), *job_dir.glob("outputs*")]:
            remove(result)


def remove_attempt(job_dir: Path, attempt: int) -> None:
    """Remove what one attempt (with several nodes) wrote: C{result[.partial].<attempt>.*}."""
    if job_dir.is_dir():
        for name in (f"result.partial.{attempt}.*", f"result.{attempt}.*"):
            for result in job_dir.glob(name):
                remove(result)


def remove_partials(job_dir: Path) -> None:
    """Remove what an encoder that did not finish wrote."""
    if job_dir.is_dir():
        for partial in [*job_dir.glob("result.partial.*"), *job_dir.glob("outputs.partial*")]:
            remove(partial)

"""
The client commands of C{transcoder}, run on the reactor: each takes its
parsed options and a L{Client}, writes results on stdout and reports on
stderr, and returns the exit code (L{transcoder.client.cli_options}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as NoAnswerInTime
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.python import usage

from transcoder.client.cli_options import (
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_LOCAL_FILE,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
)
from transcoder.client.cli_progress import Progress
from transcoder.client.cli_table import print_jobs, print_profiles

# What `jobs` shows without --limit or --all: the server's default page.
DEFAULT_LIMIT = 50
# The most jobs a page of `GET /jobs` may hold: what `jobs --all` asks for at a time.
PAGE_SIZE = 500


@dataclass
class Run:
    """What a command is doing, for what an interruption should say."""

    server: str
    server_given: bool
    following: str | None = None

    def interrupted(self, err: TextIO) -> None:
        print("transcoder: interrupted", file=err)
        if self.following is not None:
            server = f" -s {self.server}" if self.server_given else ""
            print(
                f"transcoder: job {self.following} goes on running on the server; "
                f"to stop (and delete) it: transcoder{server} cancel {self.following}",
                file=err,
            )
        err.flush()


async def run_command(
    reactor: Any,
    name: str,
    options: usage.Options,
    out: TextIO,
    err: TextIO,
    client: Any = None,
    interrupted: Callable[[], bool] = lambda: False,
    run: Run | None = None,
) -> int:
    """
    Run client command C{name} with its parsed C{options}; return the exit
    code.  Errors are reported on C{err}, results on C{out}.  C{interrupted}
    tells whether a failure is the consequence of the user's Ctrl-C or
    SIGTERM (on which the caller cancels this coroutine's L{Deferred}).
    """
    # The HTTP client's modules only for client commands: `serve` never loads them.
    from twisted.web.client import RequestTransmissionFailed, ResponseFailed

    from transcoder._twisted import RequestNotSent
    from transcoder.client import Client, NetworkError, TLSFailure, TranscoderError

    if run is None:
        run = Run(options["server"], options["server_given"])
    own_client = client is None
    if client is None:
        try:
            client = Client(
                options["server"],
                token=options["token"],
                reactor=reactor,
                cacert=options["cacert"],
                verify=not options["insecure"],
            )
        except ValueError as e:
            print(f"transcoder: {e}", file=err)
            return EXIT_USAGE
    progress = Progress(err, options["quiet"])
    try:
        return await _dispatch(client, name, options, progress, out, err, run)
    except Exception as e:
        progress.close()
        if interrupted():
            # Whatever the cancellation broke (an upload, a long-poll, a pause
            # between polls, a download) is its consequence, not a failure.
            run.interrupted(err)
            return EXIT_INTERRUPTED
        if isinstance(e, BrokenPipeError):
            # The reader went away (`transcoder jobs | head`): what it wanted is out.
            _silence(out)
            return EXIT_OK
        if isinstance(e, TLSFailure):
            print(
                f"transcoder: cannot talk to {options['server']}: {e.reason} "
                "(--cacert FILE trusts a certificate, --insecure checks none)",
                file=err,
            )
            return EXIT_CONNECTION
        if isinstance(e, NetworkError):
            print(f"transcoder: cannot talk to {options['server']}: {e.reason}", file=err)
            return EXIT_CONNECTION
        if isinstance(e, TranscoderError):
            where = f"server error {e.status}" if e.status else "error"
            print(f"transcoder: {where}: {e.code}: {e.message}", file=err)
            return EXIT_SERVER_ERROR
        if isinstance(e, CancelledError):
            # What a request that timed out raises.
            print(f"transcoder: no answer from {options['server']} in time", file=err)
            return EXIT_CONNECTION
        if isinstance(
            e,
            (
                ConnectError,
                DNSLookupError,
                ResponseFailed,
                # transcoder.client.api raises these as NetworkError; another client may not.
                RequestTransmissionFailed,
                RequestNotSent,
                TimeoutError,
                NoAnswerInTime,
            ),
        ):
            print(f"transcoder: cannot talk to {options['server']}: {_describe(e)}", file=err)
            return EXIT_CONNECTION
        if isinstance(e, OSError):
            # Reading an input or saving a result failed here, not the command line.
            print(f"transcoder: {e}", file=err)
            return EXIT_LOCAL_FILE
        raise
    finally:
        progress.close()
        if own_client:
            await client.close()


def _silence(out: TextIO) -> None:
    """Send the rest of stdout, and the flush at exit, nowhere (no second EPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests): nothing to flush at exit


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list):
        return "; ".join(str(getattr(r, "value", r)) for r in reasons) or "connection lost"
    return str(e) or type(e).__name__


def _print_job(job: Any, out: TextIO) -> None:
    print(json.dumps(job.data, indent=2), file=out, flush=True)


def _report_failure(job: Any, err: TextIO) -> None:
    print(f"transcoder: job {job.id} {job.state}", file=err)
    error = job.error or {}
    if error.get("message"):
        print(f"  {error['message']}", file=err)
    if error.get("log_tail"):
        print("  encoder log (last lines):", file=err)
        for line in str(error["log_tail"]).splitlines():
            print(f"    {line}", file=err)
    err.flush()


async def _follow(
    client: Any, job_id: str, progress: Progress, err: TextIO, run: Run
) -> tuple[int, Any]:
    run.following = job_id
    job = await client.wait(job_id, on_progress=progress.job)
    run.following = None
    progress.close()
    if job.state != "succeeded":
        _report_failure(job, err)
        return EXIT_JOB_FAILED, job
    return EXIT_OK, job


async def _save(client: Any, job_id: str, output: str, progress: Progress) -> None:
    """
    The result into the file C{output}; or, when C{output} is a directory
    (or ends with C{/}) or the job has several outputs, each output into it.
    """
    target = Path(output)
    job = await client.get(job_id)
    if target.is_dir() or output.endswith("/") or (job.output is None and job.data.get("outputs")):
        target.mkdir(parents=True, exist_ok=True)
        await client.download_outputs(job_id, target, progress.bytes("download"))
    else:
        await client.download(job_id, target, progress.bytes("download"))


async def _save_as_suggested(client: Any, job_id: str, progress: Progress, err: TextIO) -> int:
    """C{download ID} without C{-o}: as C{curl -OJ}, but never over a file nor outside C{.}."""
    from transcoder.client import TranscoderError
    from transcoder.client.names import safe_filename

    job = await client.get(job_id)
    if job.state != "succeeded":
        # Said before the HEAD, whose 409 has no body to say it.
        raise TranscoderError(
            409, "not_ready", f"the job is {job.state}; it has no result to download"
        )
    suggested = await client.suggested_name(job_id)
    name = safe_filename(suggested) or safe_filename(f"{job_id}.result")
    assert name is not None
    target = Path(name)
    exists = f"transcoder: {name} exists; not overwriting it (name another file with -o)"
    if target.exists() or target.is_symlink():
        print(exists, file=err)
        return EXIT_USAGE
    shown = name if name == suggested else f"{name} (the server suggested {suggested!r})"
    print(f"transcoder: saving the result as {shown}", file=err, flush=True)
    try:
        # The check above is for the common case; this one holds against a file made
        # while the download ran.
        await client.download(job_id, target, progress.bytes("download"), overwrite=False)
    except FileExistsError:
        print(exists, file=err)
        return EXIT_USAGE
    return EXIT_OK


async def _jobs(client: Any, options: Any, out: TextIO, err: TextIO) -> int:
    limit = None if options["all"] else (options["limit"] or DEFAULT_LIMIT)
    jobs: list[Any] = []
    more = False
    cursor: str | None = None
    while limit is None or len(jobs) < limit:
        size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(jobs))
        page, cursor = await client.page(options["state"], size, cursor)
        jobs.extend(page)
        if cursor is None or not page:
            break
    else:
        more = cursor is not None
    if limit is not None and len(jobs) > limit:
        # A server that gave more than asked for.
        jobs, more = jobs[:limit], True
    if options["json"]:
        print(json.dumps([j.data for j in jobs], indent=2), file=out)
    else:
        print_jobs(jobs, out)
    out.flush()
    if more and not options["quiet"]:
        print(f"transcoder: the newest {len(jobs)} shown; --all lists every job", file=err)
    return EXIT_OK


async def _dispatch(
    client: Any,
    name: str,
    options: Any,
    progress: Progress,
    out: TextIO,
    err: TextIO,
    run: Run,
) -> int:
    if name == "submit":
        job = await client.submit(
            options["upload"],
            options["profile"],
            options["params"],
            on_progress=progress.bytes("upload"),
        )
        progress.close()
        print(job.id, file=out, flush=True)
        if not options["wait"]:
            return EXIT_OK
        code, job = await _follow(client, job.id, progress, err, run)
        if code != EXIT_OK or not options["output"]:
            return code
        await _save(client, job.id, options["output"], progress)
        return EXIT_OK
    if name == "status":
        _print_job(await client.get(options["job"]), out)
        return EXIT_OK
    if name == "wait":
        code, job = await _follow(client, options["job"], progress, err, run)
        _print_job(job, out)
        return code
    if name == "download":
        if not options["output"]:
            return await _save_as_suggested(client, options["job"], progress, err)
        await _save(client, options["job"], options["output"], progress)
        return EXIT_OK
    if name == "cancel":
        await client.cancel(options["job"])
        return EXIT_OK
    if name == "jobs":
        return await _jobs(client, options, out, err)
    if name == "log":
        text = await client.log(options["job"], options["tail"])
        out.write(text)
        out.flush()
        return EXIT_OK
    if name == "profiles":
        profiles = await client.profiles()
        if options["json"]:
            print(json.dumps(profiles, indent=2), file=out)
        else:
            print_profiles(profiles, out)
        out.flush()
        return EXIT_OK
    raise usage.UsageError(f"unknown command {name}")

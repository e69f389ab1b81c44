"""
The C{transcoder} command's client side: C{submit}, C{status}, C{wait},
C{download}, C{cancel} and C{jobs} drive a server through
L{transcoder.client.api}.  (C{serve} is added by the entry point,
L{transcoder.cli}, so that this package imports nothing of the server.)

    transcoder submit video.flv --audio audio.mp3 --profile mux-avi --wait -o out.avi

Exit codes (see docs/client.md): 0 done; 1 the job failed or was cancelled;
2 bad usage (options, a missing file); 3 the server answered with an error;
4 the server could not be reached or the connection broke; 70 a bug (a
traceback follows); 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

import getopt
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.defer import TimeoutError as NoAnswerInTime
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.python import usage
from twisted.python.failure import Failure

from transcoder import __version__

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVER_ERROR = 3
EXIT_CONNECTION = 4
EXIT_BUG = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130
# After SIGINT or SIGTERM, the time the command has to wind down (close its
# connections) before it exits anyway; a second signal exits at once.
INTERRUPT_GRACE = 5.0

DEFAULT_SERVER = "http://127.0.0.1:8080"


class _ClientOptions(usage.Options):
    """Options every client command takes."""

    optParameters: list[list[Any]] = [
        [
            "server",
            "s",
            None,
            f"The service's URL (default: $TRANSCODER_URL, else {DEFAULT_SERVER}).",
        ],
        ["token", "t", None, "Bearer token (default: $TRANSCODER_TOKEN)."],
    ]
    optFlags: list[list[Any]] = [
        ["quiet", "q", "No progress on stderr."],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Options may follow the arguments (C{submit v.flv --profile P}), as in GNU tools."""
        argv = sys.argv[1:] if options is None else options
        try:
            opts, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        ordered: list[str] = []
        for opt, value in opts:
            if opt.startswith("--"):
                ordered.append(f"{opt}={value}" if opt[2:] + "=" in self.longOpt else opt)
            else:
                ordered.extend([opt, value] if opt[1] + ":" in self.shortOpt else [opt])
        super().parseOptions([*ordered, "--", *args])

    def postOptions(self) -> None:
        if not self["server"]:
            self["server"] = os.environ.get("TRANSCODER_URL") or DEFAULT_SERVER
        if not self["token"]:
            self["token"] = os.environ.get("TRANSCODER_TOKEN") or None


class _JobOptions(_ClientOptions):
    synopsis = "JOB_ID [options]"

    def parseArgs(self, job_id: str) -> None:  # type: ignore[override]
        self["job"] = job_id


class SubmitOptions(_ClientOptions):
    synopsis = "FILE [--audio FILE] --profile PROFILE [--param k=v ...] [--wait] [-o OUT]"
    longdesc = (
        "Upload FILE and create a job; print its id on stdout.  With --audio (or --input), "
        "the files go as multipart fields: FILE as 'video', the --audio file as 'audio'."
    )
    optParameters: list[list[Any]] = [
        ["profile", "p", None, "The profile (see GET /profiles)."],
        ["audio", "a", None, "An audio file: sends FILE as 'video' and this as 'audio'."],
        ["output", "o", None, "Wait for the job, then save its result here (implies --wait)."],
    ]
    optFlags: list[list[Any]] = [
        ["wait", "w", "Wait for the job to finish; exit 1 if it fails."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["params"] = {}
        self["inputs"] = {}

    def opt_param(self, value: str) -> None:
        """A profile parameter, NAME=VALUE (repeatable)."""
        name, sep, v = value.partition("=")
        if not sep or not name:
            raise usage.UsageError(f"--param takes NAME=VALUE, not {value!r}")
        self["params"][name] = v

    def opt_input(self, value: str) -> None:
        """A named input, NAME=FILE, for profiles with several inputs (repeatable)."""
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise usage.UsageError(f"--input takes NAME=FILE, not {value!r}")
        self["inputs"][name] = Path(path)

    def parseArgs(self, file: str | None = None) -> None:  # type: ignore[override]
        self["file"] = Path(file) if file is not None else None

    def postOptions(self) -> None:
        super().postOptions()
        if not self["profile"]:
            raise usage.UsageError("name a profile: --profile PROFILE")
        inputs: dict[str, Path] = dict(self["inputs"])
        if self["audio"]:
            if self["file"] is None:
                raise usage.UsageError("--audio goes with a video FILE")
            inputs.setdefault("video", self["file"])
            inputs["audio"] = Path(self["audio"])
        elif self["file"] is not None and inputs:
            raise usage.UsageError("give FILE with --audio, or only --input NAME=FILE")
        if self["file"] is None and not inputs:
            raise usage.UsageError("name a FILE to upload")
        self["upload"] = inputs if inputs else self["file"]
        for path in inputs.values() if inputs else [self["file"]]:
            if not path.is_file():
                raise usage.UsageError(f"no such file: {path}")
        if self["output"]:
            self["wait"] = True


class StatusOptions(_JobOptions):
    longdesc = "Print the job as JSON."


class WaitOptions(_JobOptions):
    longdesc = "Follow the job until it finishes; print it as JSON; exit 1 unless it succeeded."


class DownloadOptions(_JobOptions):
    longdesc = "Save the job's result, resuming after a dropped connection."
    optParameters: list[list[Any]] = [
        ["output", "o", None, "The file to save the result to; a directory for every output."]
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["output"]:
            raise usage.UsageError("say where to save the result: -o OUT")


class CancelOptions(_JobOptions):
    longdesc = "Cancel the job (stopping its encoder) and remove it."


class JobsOptions(_ClientOptions):
    synopsis = "[--state STATE] [--json]"
    longdesc = "List jobs: id, state, progress, profile (one a line), or --json."
    optParameters: list[list[Any]] = [
        ["state", None, None, "Only jobs in this state (queued, running, succeeded, ...)."]
    ]
    optFlags: list[list[Any]] = [["json", None, "Print the list as JSON."]]


class Options(usage.Options):
    synopsis = "transcoder COMMAND [options]"
    subCommands = [
        ["submit", None, SubmitOptions, "Upload a video and create a job."],
        ["status", None, StatusOptions, "Show a job."],
        ["wait", None, WaitOptions, "Wait for a job to finish."],
        ["download", None, DownloadOptions, "Save a job's result."],
        ["cancel", None, CancelOptions, "Cancel and remove a job."],
        ["jobs", None, JobsOptions, "List jobs."],
    ]

    def opt_version(self) -> None:
        print(f"transcoder {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command")


# The client commands.


class _Progress:
    """
    Upload, download and transcode progress on stderr: tqdm bars on a
    terminal, otherwise a plain line every tenth of the way (and at each
    change of job state), so logs stay short.
    """

    def __init__(self, err: TextIO, quiet: bool, tty: bool | None = None) -> None:
        self._err = err
        self._quiet = quiet
        self._tty = err.isatty() if tty is None else tty
        self._bar: Any = None
        self._label = ""
        self._step = -1
        self._state = ""

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def bytes(self, label: str) -> Callable[[int, int], None]:
        """A C{(done, total)} callback for an upload or download."""
        self._close_bar()
        self._label, self._step = label, -1

        def report(done: int, total: int) -> None:
            if self._quiet:
                return
            if self._tty:
                if self._bar is None:
                    from tqdm import tqdm

                    self._bar = tqdm(
                        total=total if total >= 0 else None,
                        desc=label,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        file=self._err,
                        leave=True,
                    )
                self._bar.update(done - self._bar.n)
                return
            if total <= 0:
                return
            step = done * 10 // total
            if step != self._step:
                self._step = step
                print(
                    f"{label}: {done * 100 // total}% ({_size(done)} of {_size(total)})",
                    file=self._err,
                    flush=True,
                )

        return report

    def job(self, job: Any) -> None:
        """A callback for L{transcoder.client.api.Client.wait}."""
        if self._quiet:
            return
        if self._tty:
            if job.state != self._state:
                self._close_bar()
                self._state = job.state
                if job.state in ("queued", "running"):
                    from tqdm import tqdm

                    self._bar = tqdm(
                        total=100,
                        desc=job.state,
                        file=self._err,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
                        leave=job.state == "running",
                    )
            if self._bar is not None:
                self._bar.n = min(job.progress, 100.0)
                self._bar.refresh()
            return
        step = int(job.progress // 10)
        if job.state != self._state or step != self._step:
            self._state, self._step = job.state, step
            print(f"job {job.id}: {job.state} {job.progress:.0f}%", file=self._err, flush=True)

    def close(self) -> None:
        self._close_bar()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


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
    client: Any, job_id: str, progress: _Progress, out: TextIO, err: TextIO
) -> tuple[int, Any]:
    job = await client.wait(job_id, on_progress=progress.job)
    progress.close()
    if job.state != "succeeded":
        _report_failure(job, err)
        return EXIT_JOB_FAILED, job
    return EXIT_OK, job


async def run_command(
    reactor: Any,
    name: str,
    options: usage.Options,
    out: TextIO,
    err: TextIO,
    client: Any = None,
    interrupted: Callable[[], bool] = lambda: False,
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
    from transcoder.client import Client, TranscoderError

    own_client = client is None
    if client is None:
        client = Client(options["server"], token=options["token"], reactor=reactor)
    progress = _Progress(err, options["quiet"])
    try:
        return await _dispatch(client, name, options, progress, out, err)
    except Exception as e:
        progress.close()
        if interrupted():
            # Whatever the cancellation broke (an upload, a long-poll, a pause
            # between polls, a download) is its consequence, not a failure.
            print("transcoder: interrupted", file=err)
            return EXIT_INTERRUPTED
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
                # transcoder.client.api raises these as ResponseFailed; another client may not.
                RequestTransmissionFailed,
                RequestNotSent,
                TimeoutError,
                NoAnswerInTime,
            ),
        ):
            print(f"transcoder: cannot talk to {options['server']}: {_describe(e)}", file=err)
            return EXIT_CONNECTION
        if isinstance(e, OSError):
            print(f"transcoder: {e}", file=err)
            return EXIT_USAGE
        raise
    finally:
        progress.close()
        if own_client:
            await client.close()


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list):
        return "; ".join(str(getattr(r, "value", r)) for r in reasons) or "connection lost"
    return str(e) or type(e).__name__


async def _save(client: Any, job_id: str, output: str, progress: _Progress) -> None:
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


async def _dispatch(
    client: Any, name: str, options: Any, progress: _Progress, out: TextIO, err: TextIO
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
        code, job = await _follow(client, job.id, progress, out, err)
        if code != EXIT_OK or not options["output"]:
            return code
        await _save(client, job.id, options["output"], progress)
        return EXIT_OK
    if name == "status":
        _print_job(await client.get(options["job"]), out)
        return EXIT_OK
    if name == "wait":
        code, job = await _follow(client, options["job"], progress, out, err)
        _print_job(job, out)
        return code
    if name == "download":
        await _save(client, options["job"], options["output"], progress)
        return EXIT_OK
    if name == "cancel":
        await client.cancel(options["job"])
        return EXIT_OK
    if name == "jobs":
        jobs = await client.jobs(options["state"])
        if options["json"]:
            print(json.dumps([j.data for j in jobs], indent=2), file=out)
        else:
            for j in jobs:
                print(f"{j.id}\t{j.state}\t{j.progress:.0f}%\t{j.profile}", file=out)
        out.flush()
        return EXIT_OK
    raise usage.UsageError(f"unknown command {name}")


class _Interrupted(BaseException):
    """A signal before the reactor runs: nothing has been sent yet, so just stop."""


def _stop_now(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def _catch_signals(handler: Callable[[int, FrameType | None], None]) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        # An ignored signal stays ignored, as for a command started with `&`
        # from a script (SIGINT) or under a supervisor that means it.
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, handler)


def _run_client(name: str, options: usage.Options) -> int:
    """
    Run a client command on the reactor; return its exit code.

    The reactor runs without its own signal handlers: they would stop it on
    SIGTERM under the command, which would then end with nothing said and
    exit 0.  Instead SIGINT and SIGTERM cancel the command, which winds down
    (closing its connections) and exits 130; a second signal, or
    C{INTERRUPT_GRACE} seconds, ends it at once.
    """
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    interrupted: list[int] = []
    running: list[Any] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if interrupted:
            _exit_now()
        interrupted.append(signum)
        # The one reactor call that is safe from a signal handler.
        reactor.callFromThread(cancel)

    def cancel() -> None:
        reactor.callLater(INTERRUPT_GRACE, _exit_now)
        for d in running:
            d.cancel()

    _catch_signals(interrupt)
    result = {"code": EXIT_OK}
    d = ensureDeferred(
        run_command(
            reactor, name, options, sys.stdout, sys.stderr, interrupted=lambda: bool(interrupted)
        )
    )
    running.append(d)

    def finished(code: int) -> None:
        if interrupted and code != EXIT_INTERRUPTED:
            # The signal came as the command ended (or it ignored it).
            print("transcoder: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        result["code"] = code

    def failed(f: Failure) -> None:
        if interrupted:
            print("transcoder: interrupted", file=sys.stderr)
            result["code"] = EXIT_INTERRUPTED
            return
        print("transcoder: internal error (a bug):", file=sys.stderr)
        f.printTraceback(file=sys.stderr)
        result["code"] = EXIT_BUG

    d.addCallbacks(finished, failed)
    d.addBoth(lambda _: reactor.callWhenRunning(reactor.stop))
    reactor.run(installSignalHandlers=False)
    return result["code"]


def _exit_now() -> None:
    print("transcoder: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def main(
    argv: list[str] | None = None,
    options: usage.Options | None = None,
    serve: Callable[[Any], int] | None = None,
) -> int:
    """
    Run the command in C{argv}; return its exit code.

    @param options: the commands to parse with (L{Options}, or an entry
        point's that adds C{serve}).
    @param serve: runs C{serve}'s options, when C{options} has that command.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["serve"]:
        # A client command: from now on SIGINT and SIGTERM end it with 130.
        # Until the reactor runs nothing has been sent, so they simply stop it.
        _catch_signals(_stop_now)
    try:
        return _main(argv, options if options is not None else Options(), serve)
    except _Interrupted:
        print("transcoder: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str], options: usage.Options, serve: Callable[[Any], int] | None) -> int:
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        command = options.subCommand or ""
        synopsis = getattr(getattr(options, "subOptions", None), "synopsis", None)
        print(f"transcoder: {e}", file=sys.stderr)
        if command and synopsis:
            print(f"usage: transcoder {command} {synopsis}", file=sys.stderr)
        print(f"(see: transcoder {command + ' ' if command else ''}--help)", file=sys.stderr)
        return EXIT_USAGE
    if options.subCommand == "serve" and serve is not None:
        return serve(options.subOptions)
    assert options.subCommand is not None  # postOptions
    return _run_client(options.subCommand, options.subOptions)

"""
The C{transcoder} command's client side: C{submit}, C{status}, C{wait},
C{download}, C{cancel}, C{jobs}, C{log} and C{profiles} drive a server
through L{transcoder.client.api}.  (C{serve} is added by the entry point,
L{transcoder.cli}, so that this package imports nothing of the server.)

    transcoder submit video.flv --audio audio.mp3 --profile mux-avi --wait -o out.avi

Exit codes (see docs/client.md): 0 done; 1 the job failed or was cancelled;
2 bad usage (options, a missing file); 3 the server answered with an error;
4 the server could not be reached or the connection broke; 70 a bug (a
traceback follows); 130 interrupted (SIGINT or SIGTERM).

This module runs a command on the reactor and handles signals; the options
are in L{transcoder.client.cli_options}, the commands in
L{transcoder.client.cli_commands}.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.python import usage
from twisted.python.failure import Failure

from transcoder.client.cli_commands import Run, run_command
from transcoder.client.cli_options import (
    DEFAULT_SERVER,
    EXIT_BUG,
    EXIT_CONNECTION,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_LOCAL_FILE,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    CancelOptions,
    DownloadOptions,
    JobsOptions,
    LogOptions,
    Options,
    ProfilesOptions,
    StatusOptions,
    SubmitOptions,
    WaitOptions,
)

__all__ = [
    "DEFAULT_SERVER",
    "EXIT_BUG",
    "EXIT_CONNECTION",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_LOCAL_FILE",
    "EXIT_OK",
    "EXIT_SERVER_ERROR",
    "EXIT_USAGE",
    "CancelOptions",
    "DownloadOptions",
    "JobsOptions",
    "LogOptions",
    "Options",
    "ProfilesOptions",
    "StatusOptions",
    "SubmitOptions",
    "WaitOptions",
    "main",
    "run_command",
]

# After SIGINT or SIGTERM, the time the command has to wind down (close its
# connections) before it exits anyway; a second signal exits at once.
INTERRUPT_GRACE = 5.0


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
    run = Run(options["server"], options["server_given"])

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if interrupted:
            _exit_now(run)
        interrupted.append(signum)
        # The one reactor call that is safe from a signal handler.
        reactor.callFromThread(cancel)

    def cancel() -> None:
        reactor.callLater(INTERRUPT_GRACE, _exit_now, run)
        for d in running:
            d.cancel()

    _catch_signals(interrupt)
    result = {"code": EXIT_OK}
    d = ensureDeferred(
        run_command(
            reactor,
            name,
            options,
            sys.stdout,
            sys.stderr,
            interrupted=lambda: bool(interrupted),
            run=run,
        )
    )
    running.append(d)

    def finished(code: int) -> None:
        if interrupted and code != EXIT_INTERRUPTED:
            # The signal came as the command ended (or it ignored it).
            run.interrupted(sys.stderr)
            code = EXIT_INTERRUPTED
        result["code"] = code

    def failed(f: Failure) -> None:
        if interrupted:
            run.interrupted(sys.stderr)
            result["code"] = EXIT_INTERRUPTED
            return
        print("transcoder: internal error (a bug):", file=sys.stderr)
        f.printTraceback(file=sys.stderr)
        result["code"] = EXIT_BUG

    d.addCallbacks(finished, failed)
    d.addBoth(lambda _: reactor.callWhenRunning(reactor.stop))
    reactor.run(installSignalHandlers=False)
    return result["code"]


def _exit_now(run: Run) -> None:
    run.interrupted(sys.stderr)
    try:
        sys.stdout.flush()
    except OSError:
        pass  # a reader gone: nothing more to say to it
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

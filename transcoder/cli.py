"""
The C{transcoder} command, an entry point: C{serve} runs the service
(L{transcoder.service}); every other command is the client's
(L{transcoder.client.cli}).

    transcoder serve --listen tcp:8080:interface=127.0.0.1 --data-dir ./data
    transcoder submit video.flv --audio audio.mp3 --profile mux-avi --wait -o out.avi
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from transcoder.client import cli as client_cli

if TYPE_CHECKING:
    from transcoder.service import Options as ServeOptions


def _serve_options() -> ServeOptions:
    # Imported only for `serve`: the client commands start faster without the
    # service's modules, and their signal handlers are in place sooner.
    from transcoder.service import Options as ServeOptions

    return ServeOptions()


class Options(client_cli.Options):
    subCommands = [
        ["serve", None, _serve_options, "Run the transcoding service."],
        *client_cli.Options.subCommands,
    ]


def serve(options: ServeOptions, reactor: Any = None) -> int:
    """Run the service in the foreground until SIGTERM/SIGINT; log to stdout."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from transcoder.core.jobs import StoreUnavailable
    from transcoder.service import makeService

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    try:
        service = makeService(options, reactor)
    except StoreUnavailable as e:
        print(f"transcoder: cannot start: {e}", file=sys.stderr)
        return 1
    status = {"code": 0}

    def start() -> None:
        try:
            service.startService()
        except Exception as e:
            print(f"transcoder: cannot start: {e}", file=sys.stderr)
            status["code"] = 1
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: service.stopService() if service.running else None
    )
    reactor.run()
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    """Run the command in C{argv} (default: the process's); return its exit code."""
    return client_cli.main(argv, Options(), serve)


if __name__ == "__main__":
    raise SystemExit(main())

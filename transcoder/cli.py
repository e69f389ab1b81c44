"""The C{transcoder} command: C{serve} runs the service."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from transcoder import __version__
from transcoder.service import Options as ServeOptions


class Options(usage.Options):
    synopsis = "transcoder COMMAND [options]"
    subCommands = [
        ["serve", None, ServeOptions, "Run the transcoding service."],
    ]

    def opt_version(self) -> None:
        print(f"transcoder {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command")


def serve(options: ServeOptions, reactor: Any = None) -> int:
    """Run the service in the foreground until SIGTERM/SIGINT; log to stdout."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from transcoder.service import makeService

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    service = makeService(options, reactor)
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
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"{options}\ntranscoder: {e}", file=sys.stderr)
        return 2
    if options.subCommand == "serve":
        return serve(options.subOptions)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""
The C{transcoder} command's options: the global ones (C{--server},
C{--token}, C{--quiet}, C{--cacert}, C{--insecure}), which go before the
command or after it, and each client command's.
"""

from __future__ import annotations

import getopt
import os
import sys
from pathlib import Path
from typing import Any

from twisted.python import usage

from transcoder import __version__

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVER_ERROR = 3
EXIT_CONNECTION = 4
EXIT_BUG = 70  # EX_SOFTWARE
# A local file could not be read or written while the command ran (disk full, no
# permission, a path through a file): not bad usage, and no use retrying as is.
EXIT_LOCAL_FILE = 74  # EX_IOERR
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "http://127.0.0.1:8080"

_GLOBAL_PARAMETERS: list[list[Any]] = [
    [
        "server",
        "s",
        None,
        f"The service's URL (default: $TRANSCODER_URL, else {DEFAULT_SERVER}).",
    ],
    ["token", "t", None, "Bearer token (default: $TRANSCODER_TOKEN)."],
    ["cacert", None, None, "For https://: trust the certificate (authority) in this PEM file."],
]
_GLOBAL_FLAGS: list[list[Any]] = [
    ["quiet", "q", "No progress on stderr."],
    ["insecure", "k", "For https://: check no certificate (encrypted, not authenticated)."],
]


class _ClientOptions(usage.Options):
    """Options every client command takes, here or before the command's name."""

    optParameters: list[list[Any]] = _GLOBAL_PARAMETERS
    optFlags: list[list[Any]] = _GLOBAL_FLAGS

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
        # `transcoder -s URL jobs`: what the command line gave before the
        # command's name, unless given again after it.
        parent = getattr(self, "parent", None)
        if parent is not None:
            for name in ("server", "token", "cacert"):
                if not self[name]:
                    self[name] = parent.get(name)
            for name in ("quiet", "insecure"):
                self[name] = bool(self[name] or parent.get(name))
        self["server_given"] = bool(self["server"])
        if not self["server"]:
            self["server"] = os.environ.get("TRANSCODER_URL") or DEFAULT_SERVER
        if not self["token"]:
            self["token"] = os.environ.get("TRANSCODER_TOKEN") or None
        if self["cacert"] and not os.access(self["cacert"], os.R_OK):
            raise usage.UsageError(f"cannot read the --cacert file {self['cacert']}")


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
        ["profile", "p", None, "The profile (see: transcoder profiles)."],
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
    synopsis = "JOB_ID [-o OUT] [options]"
    longdesc = (
        "Save the job's result, resuming after a dropped connection.  Without -o, under the "
        "name the server suggests (the input's name with the output's extension), in the "
        "current directory, never over an existing file."
    )
    optParameters: list[list[Any]] = [
        ["output", "o", None, "The file to save the result to; a directory for every output."],
    ]


class CancelOptions(_JobOptions):
    longdesc = "Delete the job: stop its encoder if it runs, then remove it and its files."


class LogOptions(_JobOptions):
    longdesc = "Print what the job's encoder wrote (its log)."
    optParameters: list[list[Any]] = [
        ["tail", "n", None, "Only the last N lines.", int],
    ]


class JobsOptions(_ClientOptions):
    synopsis = "[--state STATE] [--limit N | --all] [--json]"
    longdesc = (
        "List jobs, newest first, under a header: id, state, progress, profile, file, created "
        "(UTC).  The newest 50 unless --limit or --all says otherwise."
    )
    optParameters: list[list[Any]] = [
        ["state", None, None, "Only jobs in this state (queued, running, succeeded, ...)."],
        ["limit", "n", None, "At most N jobs (default 50).", int],
    ]
    optFlags: list[list[Any]] = [
        ["all", "a", "Every job, following the server's pages to the end."],
        ["json", None, "Print the list as JSON."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["all"] and self["limit"] is not None:
            raise usage.UsageError("--all or --limit N, not both")
        if self["limit"] is not None and self["limit"] < 1:
            raise usage.UsageError("--limit takes a number from 1")


class ProfilesOptions(_ClientOptions):
    synopsis = "[--json]"
    longdesc = "List the server's profiles: inputs, output and each parameter's type and range."
    optFlags: list[list[Any]] = [["json", None, "Print them as JSON."]]


class Options(usage.Options):
    synopsis = "transcoder [--server URL] [--token T] [--quiet] COMMAND [options]"
    optParameters: list[list[Any]] = _GLOBAL_PARAMETERS
    optFlags: list[list[Any]] = _GLOBAL_FLAGS
    subCommands = [
        ["submit", None, SubmitOptions, "Upload a video and create a job."],
        ["status", None, StatusOptions, "Show a job."],
        ["wait", None, WaitOptions, "Wait for a job to finish."],
        ["download", None, DownloadOptions, "Save a job's result."],
        ["cancel", None, CancelOptions, "Delete a job, stopping it if it runs."],
        ["jobs", None, JobsOptions, "List jobs."],
        ["log", None, LogOptions, "Print a job's encoder log."],
        ["profiles", None, ProfilesOptions, "List the server's profiles and their parameters."],
    ]

    def opt_version(self) -> None:
        print(f"transcoder {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command")

"""
The service's options from C{TRANSCODER_*} environment variables, for the
entry points that take no command line (C{twistd -ny tap.py}, C{twistd web
--class transcoder.webfactory.resource}).

Each option of L{transcoder.service.Options} has a variable: C{--data-dir}
is C{TRANSCODER_DATA_DIR}.  The variables become an argv parsed by that one
Options class, so every check and default is the same as on the command line.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.python import usage

from transcoder.service import Options

PREFIX = "TRANSCODER_"
# The client's variables (transcoder.cli), not options of the service.
CLIENT_VARIABLES = frozenset({"TRANSCODER_URL", "TRANSCODER_TOKEN"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def variable_name(option: str) -> str:
    """C{"data-dir"} -> C{"TRANSCODER_DATA_DIR"}."""
    return PREFIX + option.upper().replace("-", "_")


def env_argv(environ: Mapping[str, str], options: usage.Options | None = None) -> list[str]:
    """
    The command line that the C{TRANSCODER_*} variables in C{environ} stand
    for.  An empty variable counts as unset.  A variable that names no option
    is an error rather than silently ignored, since it is most likely a typo.
    """
    opts = Options() if options is None else options
    takes_value: dict[str, bool] = {}
    for spec in opts.longOpt:
        name = spec.rstrip("=")
        if name not in ("help", "version"):
            takes_value[variable_name(name)] = spec.endswith("=")
    argv: list[str] = []
    for key in sorted(environ):
        if not key.startswith(PREFIX) or key in CLIENT_VARIABLES:
            continue
        if key not in takes_value:
            known = ", ".join(sorted(takes_value))
            raise usage.UsageError(f"unknown variable {key} (known: {known})")
        value = environ[key]
        option = "--" + key[len(PREFIX) :].lower().replace("_", "-")
        if takes_value[key]:
            if value != "":
                argv.append(f"{option}={value}")
        elif value.strip().lower() in _TRUE:
            argv.append(option)
        elif value.strip().lower() not in _FALSE:
            raise usage.UsageError(f"{key} must be 1/0, true/false, yes/no or on/off")
    return argv


def options_from_env(environ: Mapping[str, str]) -> Options:
    """Parsed service options from C{environ}; raises L{usage.UsageError} naming the variable."""
    options = Options()
    argv = env_argv(environ, options)
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        raise usage.UsageError(f"{e} (from TRANSCODER_* variables: {' '.join(argv)})") from None
    return options

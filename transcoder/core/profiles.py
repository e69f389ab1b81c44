"""
Profiles: server-side encoding recipes that jobs name.

A client never sends a command line.  It names a profile and may set only the
parameters the profile declares; each value is checked for type and range
before it is substituted into the profile's argv template.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from transcoder.core.errors import Invalid
from transcoder.core.outputs import OutputSpec, parse_outputs
from transcoder.core.parameters import (
    NAME,
    RESERVED_FIELDS,
    Parameter,
    ParamValue,
    ProfileError,
    build_parameter,
    format_value,
    validate_params,
)

__all__ = [
    "RESERVED_FIELDS",
    "ParamValue",
    "Parameter",
    "Profile",
    "ProfileError",
    "builtin_profiles",
    "format_value",
    "load_profiles",
    "parse_profiles",
    "profile_for",
]

ProgressKind = Literal["mencoder", "ffmpeg", "none"]
STREAM_KINDS = ("audio", "video")
# Placeholders filled from the first input's probe: a profile naming one has
# its encoder wait for the probes.  {ladder} is the HLS renditions'
# arguments, from the rungs a C{rungs} parameter picks (engine/ladder.py).
PROBED_PLACEHOLDERS = frozenset({"input_duration", "input_height", "ladder"})

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
# Anything in braces that looks like a name: a placeholder mistyped ({Height},
# {out-put}) would otherwise reach argv as it stands.
_BRACED = re.compile(r"\{([A-Za-z0-9_-]+)\}")
_EXTENSION = re.compile(r"^[a-z0-9]{1,8}$")
_MEDIA_TYPE = re.compile(r"^[a-z]+/[A-Za-z0-9.+-]+$")
PROFILE_KEYS = frozenset(
    {
        "description",
        "executable",
        "argv",
        "inputs",
        "needs",
        "output_extension",
        "media_type",
        "progress",
        "timeout",
        "duration_tolerance",
        "parameters",
        "outputs",
    }
)


@dataclass(frozen=True)
class Profile:
    """A named recipe: which encoder to run, on which inputs, producing what."""

    name: str
    description: str
    executable: str
    argv: tuple[str, ...]
    inputs: tuple[str, ...] = ("file",)
    output_extension: str = "bin"
    media_type: str = "application/octet-stream"
    progress: ProgressKind = "none"
    timeout: float | None = None
    parameters: Mapping[str, Parameter] = field(default_factory=dict)
    # Allowed relative difference between the output's and the input's duration.
    duration_tolerance: float = 0.05
    # Per input, the kinds of stream it must hold ("audio", "video"): an input
    # without one fails the job saying so, rather than with the encoder's words.
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Declared outputs of a profile that writes a directory ({output_dir});
    # empty for one that writes one file ({output}).
    outputs: tuple[OutputSpec, ...] = ()
    # Its argv names a placeholder filled from the inputs' probe.
    probe_first: bool = False

    @property
    def multi_output(self) -> bool:
        return bool(self.outputs)

    def validate_params(self, raw: Mapping[str, str]) -> dict[str, ParamValue]:
        """
        Check a client's parameters and fill in defaults.

        @raise Invalid: for an unknown parameter or a bad value.
        """
        return validate_params(self.name, self.parameters, raw)

    def build_argv(
        self,
        inputs: Mapping[str, str],
        output: str,
        params: Mapping[str, ParamValue],
        probed: Mapping[str, str | list[str]] | None = None,
    ) -> list[str]:
        """
        The encoder's full argv: only checked values fill the placeholders.

        @param output: the output file, or directory for a multi-output profile.
        @param probed: the values of L{PROBED_PLACEHOLDERS}; a list stands
            for several arguments, and fills only an argument that is the
            placeholder alone.
        """
        values: dict[str, str | list[str]] = {k: format_value(v) for k, v in params.items()}
        values.update(inputs)
        values.update(probed or {})
        values["output"] = values["output_dir"] = output
        argv = [self.executable]
        for part in self.argv:
            whole = _PLACEHOLDER.fullmatch(part)
            if whole is not None and isinstance(values[whole.group(1)], list):
                argv.extend(values[whole.group(1)])
                continue
            argv.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), part))
        return argv

    def to_json(self) -> dict[str, Any]:
        """What a client needs to build a form for this profile, and what it will get."""
        return {
            "name": self.name,
            "description": self.description,
            "inputs": list(self.inputs),
            "needs": {role: list(kinds) for role, kinds in self.needs.items()},
            "output_extension": self.output_extension,
            "media_type": self.media_type,
            "outputs": [
                {
                    "name": s.name,
                    "extension": s.name.rpartition(".")[2] if "." in s.name else "",
                    "media_type": s.media_type,
                    "check": s.check,
                    **({"count": s.to_json()["count"]} if s.count is not None else {}),
                }
                for s in self.outputs
            ]
            or [
                {
                    "name": f"result.{self.output_extension}",
                    "extension": self.output_extension,
                    "media_type": self.media_type,
                    "check": "media",
                }
            ],
            "timeout": self.timeout,
            "parameters": {n: p.to_json() for n, p in self.parameters.items()},
        }


def profile_for(profiles: Mapping[str, Profile], name: str | None) -> Profile:
    """The profile a client named, or L{Invalid} saying what it may name."""
    if not name:
        raise Invalid("missing_profile", "name a profile: ?profile=NAME (see GET /profiles)")
    profile = profiles.get(name)
    if profile is None:
        raise Invalid(
            "unknown_profile",
            f"no profile {name[:64]!r}; known: {', '.join(sorted(profiles))}",
        )
    return profile


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _profile(name: str, spec: object) -> Profile:
    def error(key: str | None, why: str) -> ProfileError:
        return ProfileError(f"profile {name!r}" + (f", key {key!r}" if key else "") + f": {why}")

    if not NAME.match(name):
        raise error(None, "bad name (lower-case letters, digits, - and _)")
    if not isinstance(spec, dict):
        raise error(None, "must be a table")
    for key in spec:
        if key not in PROFILE_KEYS:
            raise error(key, f"unknown key (known: {', '.join(sorted(PROFILE_KEYS))})")
    for key in ("executable", "argv"):
        if key not in spec:
            raise error(key, "missing")
    executable = spec["executable"]
    if not isinstance(executable, str) or not executable or executable.startswith("-"):
        raise error("executable", "must be a program's name or path")
    argv = spec["argv"]
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise error("argv", "argv must be a list of strings")
    inputs = spec.get("inputs", ["file"])
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(isinstance(i, str) and NAME.match(i) and "-" not in i for i in inputs)
        or len(set(inputs)) != len(inputs)
        or set(inputs) & (RESERVED_FIELDS | {"output"})
    ):
        raise error("inputs", "inputs must be a non-empty list of distinct names")
    raw_params = spec.get("parameters", {})
    if not isinstance(raw_params, dict):
        raise error("parameters", "must be a table of parameters")
    params = {pname: build_parameter(name, pname, pspec) for pname, pspec in raw_params.items()}
    if set(params) & set(inputs):
        raise error("parameters", f"{sorted(set(params) & set(inputs))} are inputs too")
    outputs: tuple[OutputSpec, ...] = ()
    target = "output"
    if "outputs" in spec:
        outputs = parse_outputs(spec["outputs"], params, error)
        target = "output_dir"
        for key in ("output_extension", "media_type"):
            if key in spec:
                raise error(key, "a profile with outputs declares media types there")
    known = set(inputs) | set(params) | {target} | PROBED_PLACEHOLDERS
    used = {m for a in argv for m in _BRACED.findall(a)}
    if used - known:
        unknown = ", ".join(f"{{{u}}}" for u in sorted(used - known))
        # The probe's placeholders are in docs/profiles.md; listed here they
        # would bury the names a typo most likely meant.
        allowed = ", ".join(f"{{{k}}}" for k in sorted(known - PROBED_PLACEHOLDERS))
        raise error("argv", f"unknown placeholders {unknown} (known: {allowed})")
    if target not in used:
        raise error("argv", f"argv never names {{{target}}}")
    rungs = params.get("rungs")
    if "ladder" in used and ("{ladder}" not in argv or rungs is None or rungs.type != "string"):
        raise error("argv", "{ladder} must be an argument alone, with a string parameter rungs")
    if set(inputs) - used:
        raise error("argv", f"inputs {sorted(set(inputs) - used)} never used in argv")
    needs = _needs(spec.get("needs", {}), inputs, error)
    progress = spec.get("progress", "none")
    if progress not in ("mencoder", "ffmpeg", "none"):
        raise error("progress", "progress must be mencoder, ffmpeg or none")
    ext = spec.get("output_extension", "bin")
    if not isinstance(ext, str) or not _EXTENSION.match(ext):
        raise error("output_extension", "bad output_extension (1-8 lower-case letters or digits)")
    media_type = spec.get("media_type", "application/octet-stream")
    if not isinstance(media_type, str) or not _MEDIA_TYPE.match(media_type):
        raise error("media_type", "must be a media type such as video/mp4")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise error("description", "must be a string")
    timeout = spec.get("timeout")
    if timeout is not None and not (_is_number(timeout) and timeout > 0):
        raise error("timeout", "must be a positive number of seconds")
    tolerance = spec.get("duration_tolerance", 0.05)
    if not (_is_number(tolerance) and 0 <= tolerance <= 1):
        raise error("duration_tolerance", "must be a number from 0 to 1")
    return Profile(
        name=name,
        description=description,
        executable=executable,
        argv=tuple(argv),
        inputs=tuple(inputs),
        output_extension=ext,
        media_type=media_type,
        progress=progress,
        timeout=float(timeout) if timeout is not None else None,
        parameters=params,
        duration_tolerance=float(tolerance),
        needs=needs,
        outputs=outputs,
        probe_first=bool(used & PROBED_PLACEHOLDERS),
    )


def _needs(
    raw: object, inputs: list[str], error: Callable[[str | None, str], ProfileError]
) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise error("needs", "must be a table: input name = list of stream kinds")
    needs: dict[str, tuple[str, ...]] = {}
    for role, kinds in raw.items():
        if role not in inputs:
            raise error("needs", f"{role!r} is not one of the inputs {inputs}")
        if not isinstance(kinds, list) or not all(k in STREAM_KINDS for k in kinds):
            raise error("needs", f"{role} = must be a list of {' or '.join(STREAM_KINDS)}")
        needs[role] = tuple(kinds)
    return needs


def parse_profiles(text: str) -> dict[str, Profile]:
    """Parse a profiles TOML document: one table per profile."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"not valid TOML: {e}") from None
    out: dict[str, Profile] = {}
    for name, spec in doc.items():
        if name == "replace_builtins":
            if not isinstance(spec, bool):
                raise ProfileError("key 'replace_builtins': must be true or false")
            continue
        out[name] = _profile(name, spec)
    return out


def builtin_profiles() -> dict[str, Profile]:
    return parse_profiles(
        files("transcoder.core").joinpath("builtin_profiles.toml").read_text("utf-8")
    )


def load_profiles(path: Path | None = None) -> dict[str, Profile]:
    """
    The built-in profiles, extended (or overridden by name) by C{path}.

    A file whose top level says C{replace_builtins = true} replaces them.
    Each of the file's executables must be found on the server's C{PATH}
    (the one its encoders get) now, not when the first job runs.

    @raise ProfileError: naming the file, the profile and the key at fault.
    @raise OSError: the file cannot be read.
    """
    profiles = builtin_profiles()
    if path is None:
        return profiles
    text = Path(path).read_text("utf-8")
    try:
        extra = parse_profiles(text)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None
    search = os.environ.get("PATH") or os.defpath
    for profile in extra.values():
        if shutil.which(profile.executable, path=search) is None:
            raise ProfileError(
                f"{path}: profile {profile.name!r}, key 'executable': "
                f"{profile.executable!r} is not an executable on PATH ({search})"
            )
    if tomllib.loads(text).get("replace_builtins") is True:
        profiles = {}
    profiles.update(extra)
    return profiles

"""
Profiles: server-side encoding recipes that jobs name.

A client never sends a command line.  It names a profile and may set only the
parameters the profile declares; each value is checked for type and range
before it is substituted into the profile's argv template.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from transcoder.core.errors import Invalid

ParamValue = int | float | str
ProgressKind = Literal["mencoder", "ffmpeg", "none"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Plain ASCII numbers only: int() and float() also take " 1_000 ", "1e3" and
# other scripts' digits, which no client means to send.
_NUMBER = re.compile(r"^(-?)([0-9]+)(\.[0-9]+)?\Z")
# Longer (leading zeros aside) is far past any range, and int() would refuse
# more than 4300 digits.
_MAX_DIGITS = 18
_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
# Choices are substituted into argv, so they must never look like options or paths.
_SAFE_CHOICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+]*$")
RESERVED_FIELDS = frozenset({"profile", "filename", "sha256", "callback_url", "output"})


class ProfileError(ValueError):
    """A profiles file is malformed."""


@dataclass(frozen=True)
class Parameter:
    """A client-settable value with its type and allowed range."""

    name: str
    type: Literal["int", "float", "choice"]
    default: ParamValue
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    description: str = ""

    def parse(self, raw: str) -> ParamValue:
        """Convert a client's string, or raise L{Invalid} saying why not."""
        value: ParamValue
        if self.type == "choice":
            if raw not in self.choices:
                raise _bad_param(self.name, f"must be one of {', '.join(self.choices)}")
            return raw
        m = _NUMBER.match(raw)
        if m is None or (self.type == "int" and m.group(3)):
            raise _bad_param(
                self.name, f"must be {'an integer' if self.type == 'int' else 'a number'}"
            )
        sign, whole, fraction = m.groups()
        whole = whole.lstrip("0") or "0"
        if len(whole) > _MAX_DIGITS:
            # A number still, only too far from any range to convert.
            bound = self.minimum if sign else self.maximum
            if bound is not None:
                raise _bad_param(
                    self.name, f"must be {'at least' if sign else 'at most'} {_fmt(bound)}"
                )
            raise _bad_param(self.name, f"has more than {_MAX_DIGITS} digits")
        if self.type == "int":
            value = int(sign + whole)
        else:
            # + 0.0: "-0" is zero, never "-0.0" in an encoder's argv.
            value = float(sign + whole + (fraction or "")) + 0.0
        if self.minimum is not None and value < self.minimum:
            raise _bad_param(self.name, f"must be at least {_fmt(self.minimum)}")
        if self.maximum is not None and value > self.maximum:
            raise _bad_param(self.name, f"must be at most {_fmt(self.maximum)}")
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "default": self.default}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        if self.description:
            out["description"] = self.description
        return out


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

    def validate_params(self, raw: Mapping[str, str]) -> dict[str, ParamValue]:
        """
        Check a client's parameters and fill in defaults.

        @raise Invalid: for an unknown parameter or a bad value.
        """
        for name in raw:
            if name not in self.parameters:
                raise Invalid("unknown_parameter", f"profile {self.name} has no parameter {name!r}")
        return {
            name: (p.parse(raw[name]) if name in raw else p.default)
            for name, p in self.parameters.items()
        }

    def build_argv(
        self, inputs: Mapping[str, str], output: str, params: Mapping[str, ParamValue]
    ) -> list[str]:
        """The encoder's full argv: only checked values fill the placeholders."""
        values: dict[str, str] = {k: format_value(v) for k, v in params.items()}
        values.update(inputs)
        values["output"] = output
        argv = [self.executable]
        for part in self.argv:
            argv.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], part))
        return argv

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputs": list(self.inputs),
            "output_extension": self.output_extension,
            "media_type": self.media_type,
            "timeout": self.timeout,
            "parameters": {n: p.to_json() for n, p in self.parameters.items()},
        }


def _bad_param(name: str, why: str) -> Invalid:
    return Invalid("invalid_parameter", f"parameter {name!r} {why}")


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


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else format_value(float(x))


def format_value(value: ParamValue) -> str:
    """
    A parameter's value as it goes into argv: a float in plain decimals
    (C{1e-07} is C{0.0000001}), with no sign on zero, so that a value starts
    with C{-} only where it is negative (and its range allows that).
    """
    if not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0.0"
    # repr() is the shortest text that reads back as the same float.
    text = format(Decimal(repr(value)), "f")
    return text if "." in text else text + ".0"


def _parameter(profile: str, name: str, spec: Mapping[str, Any]) -> Parameter:
    where = f"profile {profile!r} parameter {name!r}"
    if not _NAME.match(name) or "-" in name or name in RESERVED_FIELDS:
        raise ProfileError(f"{where}: bad or reserved name")
    kind = spec.get("type")
    if kind not in ("int", "float", "choice"):
        raise ProfileError(f"{where}: type must be int, float or choice")
    if "default" not in spec:
        raise ProfileError(f"{where}: needs a default")
    choices = tuple(spec.get("choices", ()))
    if kind == "choice":
        if not choices or not all(isinstance(c, str) and _SAFE_CHOICE.match(c) for c in choices):
            raise ProfileError(f"{where}: choices must be plain words")
    param = Parameter(
        name=name,
        type=kind,
        default=spec["default"],
        minimum=spec.get("minimum"),
        maximum=spec.get("maximum"),
        choices=choices,
        description=str(spec.get("description", "")),
    )
    try:
        param.parse(str(param.default))
    except Invalid as e:
        raise ProfileError(f"{where}: default {param.default!r} is invalid: {e.message}") from None
    return param


def _profile(name: str, spec: Mapping[str, Any]) -> Profile:
    where = f"profile {name!r}"
    if not _NAME.match(name):
        raise ProfileError(f"{where}: bad name")
    for key in ("executable", "argv"):
        if key not in spec:
            raise ProfileError(f"{where}: missing {key}")
    argv = spec["argv"]
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ProfileError(f"{where}: argv must be a list of strings")
    inputs = tuple(spec.get("inputs", ["file"]))
    if not inputs or not all(isinstance(i, str) and _NAME.match(i) for i in inputs):
        raise ProfileError(f"{where}: inputs must be a non-empty list of names")
    params = {
        pname: _parameter(name, pname, pspec)
        for pname, pspec in dict(spec.get("parameters", {})).items()
    }
    known = set(inputs) | set(params) | {"output"}
    used = {m for a in argv for m in _PLACEHOLDER.findall(a)}
    if used - known:
        raise ProfileError(f"{where}: unknown placeholders {sorted(used - known)}")
    if "output" not in used:
        raise ProfileError(f"{where}: argv never names {{output}}")
    if set(inputs) - used:
        raise ProfileError(f"{where}: inputs {sorted(set(inputs) - used)} never used in argv")
    progress = spec.get("progress", "none")
    if progress not in ("mencoder", "ffmpeg", "none"):
        raise ProfileError(f"{where}: progress must be mencoder, ffmpeg or none")
    ext = str(spec.get("output_extension", "bin"))
    if not re.match(r"^[a-z0-9]{1,8}$", ext):
        raise ProfileError(f"{where}: bad output_extension")
    timeout = spec.get("timeout")
    return Profile(
        name=name,
        description=str(spec.get("description", "")),
        executable=str(spec["executable"]),
        argv=tuple(argv),
        inputs=inputs,
        output_extension=ext,
        media_type=str(spec.get("media_type", "application/octet-stream")),
        progress=progress,
        timeout=float(timeout) if timeout is not None else None,
        parameters=params,
        duration_tolerance=float(spec.get("duration_tolerance", 0.05)),
    )


def parse_profiles(text: str) -> dict[str, Profile]:
    """Parse a profiles TOML document: one table per profile."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"not valid TOML: {e}") from None
    out: dict[str, Profile] = {}
    for name, spec in doc.items():
        if name == "replace_builtins":
            continue
        if not isinstance(spec, dict):
            raise ProfileError(f"profile {name!r} must be a table")
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
    """
    profiles = builtin_profiles()
    if path is None:
        return profiles
    text = Path(path).read_text("utf-8")
    extra = parse_profiles(text)
    if tomllib.loads(text).get("replace_builtins") is True:
        profiles = {}
    profiles.update(extra)
    return profiles

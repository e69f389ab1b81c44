"""
A profile's parameters: the only values a client sets, each checked for type
and range (or choices, or pattern) before it reaches an encoder's argv.

No value that passes these checks starts with C{-} (an encoder would take it
for an option) unless it is a number whose declared range allows a negative.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from transcoder.core.errors import Invalid

# bool is an int to Python: it needs no place of its own in the union.
ParamValue = int | float | str
ParamType = Literal["int", "float", "choice", "bool", "string"]
PARAM_TYPES: tuple[ParamType, ...] = ("int", "float", "choice", "bool", "string")

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
RESERVED_FIELDS = frozenset({"profile", "filename", "sha256", "callback_url", "output"})
# Plain ASCII numbers only: int() and float() also take " 1_000 ", "1e3" and
# other scripts' digits, which no client means to send.
_NUMBER = re.compile(r"^(-?)([0-9]+)(\.[0-9]+)?\Z")
# Longer (leading zeros aside) is far past any range, and int() would refuse
# more than 4300 digits.
_MAX_DIGITS = 18
# Choices are substituted into argv, so they must never look like options or paths.
_SAFE_CHOICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+]*$")
# A string parameter's longest value: far above any title or code a profile
# takes, and it bounds the work of matching a profile's pattern.
MAX_STRING = 256
_TRUE = ("true", "1")
_FALSE = ("false", "0")
# The keys each type takes besides type, default and description.
_TYPE_KEYS: dict[str, frozenset[str]] = {
    "int": frozenset({"minimum", "maximum"}),
    "float": frozenset({"minimum", "maximum"}),
    "choice": frozenset({"choices"}),
    "bool": frozenset(),
    "string": frozenset({"pattern"}),
}


class ProfileError(ValueError):
    """A profiles file is malformed; the message names the profile and the key."""


@dataclass(frozen=True)
class Parameter:
    """A client-settable value with its type and allowed range, choices or pattern."""

    name: str
    type: ParamType
    default: ParamValue
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    description: str = ""
    # string only: the whole value must match it (ASCII classes).
    pattern: str | None = None

    def parse(self, raw: str) -> ParamValue:
        """Convert a client's string, or raise L{Invalid} saying why not."""
        if self.type == "choice":
            if raw not in self.choices:
                raise _bad_param(self.name, f"must be one of {', '.join(self.choices)}")
            return raw
        if self.type == "bool":
            if raw in _TRUE:
                return True
            if raw in _FALSE:
                return False
            raise _bad_param(self.name, "must be true or false")
        if self.type == "string":
            self.check(raw)
            return raw
        return self.check(self._number(raw))

    def check(self, value: ParamValue) -> ParamValue:
        """C{value} if it is in range (or matches), else L{Invalid} saying why not."""
        if self.type == "string":
            assert isinstance(value, str) and self.pattern is not None
            if len(value) > MAX_STRING:
                raise _bad_param(self.name, f"is longer than {MAX_STRING} characters")
            if value.startswith("-"):
                raise _bad_param(self.name, "must not start with '-'")
            if re.fullmatch(self.pattern, value, re.ASCII) is None:
                raise _bad_param(self.name, f"must match {self.pattern}")
        elif self.type == "choice":
            if value not in self.choices:
                raise _bad_param(self.name, f"must be one of {', '.join(self.choices)}")
        elif self.type in ("int", "float"):
            assert isinstance(value, int | float)
            if self.minimum is not None and value < self.minimum:
                raise _bad_param(self.name, f"must be at least {_fmt(self.minimum)}")
            if self.maximum is not None and value > self.maximum:
                raise _bad_param(self.name, f"must be at most {_fmt(self.maximum)}")
        return value

    def _number(self, raw: str) -> int | float:
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
            return int(sign + whole)
        # + 0.0: "-0" is zero, never "-0.0" in an encoder's argv.
        return float(sign + whole + (fraction or "")) + 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "default": self.default}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        if self.pattern is not None:
            out["pattern"] = self.pattern
            out["max_length"] = MAX_STRING
        if self.description:
            out["description"] = self.description
        return out


def _bad_param(name: str, why: str) -> Invalid:
    return Invalid("invalid_parameter", f"parameter {name!r} {why}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else format_value(float(x))


def format_value(value: ParamValue) -> str:
    """
    A parameter's value as it goes into argv: a bool as C{1} or C{0}, a float
    in plain decimals (C{1e-07} is C{0.0000001}), with no sign on zero, so
    that a value starts with C{-} only where it is negative (and its range
    allows that).
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    if not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0.0"
    # repr() is the shortest text that reads back as the same float.
    text = format(Decimal(repr(value)), "f")
    return text if "." in text else text + ".0"


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def build_parameter(profile: str, name: str, spec: object) -> Parameter:
    """
    The parameter C{name} of C{profile} that the table C{spec} declares.

    @raise ProfileError: naming the profile and the key at fault.
    """

    def error(key: str | None, why: str) -> ProfileError:
        at = f"parameters.{name}" + (f".{key}" if key else "")
        return ProfileError(f"profile {profile!r}, key {at!r}: {why}")

    if not NAME.match(name) or "-" in name or name in RESERVED_FIELDS:
        raise error(None, "bad or reserved name (lower-case letters, digits and _)")
    if not isinstance(spec, dict):
        raise error(None, "must be a table")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise error("type", f"must be one of {', '.join(PARAM_TYPES)}")
    allowed = _TYPE_KEYS[kind] | {"type", "default", "description"}
    for key in spec:
        if key not in allowed:
            raise error(key, f"unknown key for a {kind} parameter")
    if "default" not in spec:
        raise error("default", "missing: every parameter needs a default")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise error("description", "must be a string")
    minimum = maximum = None
    choices: tuple[str, ...] = ()
    pattern = None
    if kind in ("int", "float"):
        for key in ("minimum", "maximum"):
            if key not in spec:
                raise error(key, f"missing: an {kind} parameter needs a minimum and a maximum")
            if not (isinstance(spec[key], int) if kind == "int" else _is_number(spec[key])):
                raise error(key, f"must be {'an integer' if kind == 'int' else 'a number'}")
            if isinstance(spec[key], bool):
                raise error(key, "must be an integer")
        minimum, maximum = spec["minimum"], spec["maximum"]
        if minimum > maximum:
            raise error("maximum", f"{maximum} is below the minimum {minimum}")
    elif kind == "choice":
        raw_choices = spec.get("choices")
        if not isinstance(raw_choices, list) or not raw_choices:
            raise error("choices", "missing: a choice parameter needs a list of choices")
        if not all(isinstance(c, str) and _SAFE_CHOICE.match(c) for c in raw_choices):
            raise error(
                "choices", "choices must be plain words (letters, digits, _ . +; no leading -)"
            )
        choices = tuple(raw_choices)
    elif kind == "string":
        pattern = spec.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise error("pattern", "missing: a string parameter needs a pattern its values match")
        try:
            re.compile(pattern, re.ASCII)
        except re.error as e:
            raise error("pattern", f"not a regular expression: {e}") from None
    default = spec["default"]
    type_ok = {
        "int": isinstance(default, int) and not isinstance(default, bool),
        "float": _is_number(default),
        "choice": isinstance(default, str),
        "bool": isinstance(default, bool),
        "string": isinstance(default, str),
    }[kind]
    if not type_ok:
        raise error("default", f"{default!r} is not a {kind}")
    param = Parameter(
        name=name,
        type=kind,
        default=float(default) if kind == "float" else default,
        minimum=minimum,
        maximum=maximum,
        choices=choices,
        description=description,
        pattern=pattern,
    )
    try:
        param.check(param.default)
    except Invalid as e:
        raise error("default", f"default {default!r} is invalid: {e.message}") from None
    return param


def validate_params(
    profile: str, parameters: Mapping[str, Parameter], raw: Mapping[str, str]
) -> dict[str, ParamValue]:
    """
    A client's parameters checked, with defaults filled in.

    @raise Invalid: for an unknown parameter or a bad value.
    """
    for name in raw:
        if name not in parameters:
            raise Invalid("unknown_parameter", f"profile {profile} has no parameter {name!r}")
    return {
        name: (p.parse(raw[name]) if name in raw else p.default) for name, p in parameters.items()
    }

"""
What a profile with several outputs declares it makes: the C{outputs} key.

Such a profile writes into a directory (C{{output_dir}} in its argv) rather
than one file.  Each declared output is a file name, or a pattern with C{*}
for the files of one kind (C{thumb-*.jpg}, C{*/seg-*.ts}); every file the
encoder leaves must match one of them, and each is checked as its C{check}
says before the job may succeed (L{transcoder.engine.outputs}).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from transcoder.core.parameters import Parameter

CheckKind = Literal["media", "hls", "image", "none"]
CHECKS: tuple[CheckKind, ...] = ("media", "hls", "image", "none")
OUTPUT_KEYS = frozenset({"name", "media_type", "check", "count", "description"})

# One path segment of an output's name: what a client may ask for, and what a
# pattern may match.  No leading dot (no ".", "..", hidden files), no slash.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
OUTPUT_NAME = re.compile(rf"^{_SEGMENT}(/{_SEGMENT}){{0,3}}$")
_PATTERN = re.compile(
    r"^[A-Za-z0-9_*][A-Za-z0-9_.*-]{0,127}(/[A-Za-z0-9_*][A-Za-z0-9_.*-]{0,127}){0,3}$"
)
_COUNT_PARAM = re.compile(r"^\{([a-z][a-z0-9_]*)\}$")
_MEDIA_TYPE = re.compile(r"^[a-z]+/[A-Za-z0-9.+-]+$")


def is_output_name(name: str) -> bool:
    """Whether C{name} may name a job's output: relative, no C{..}, at most four levels."""
    return bool(OUTPUT_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class OutputSpec:
    """
    One declared output: a file name or a pattern, its media type, how it is
    checked, and how many files must match it (C{count}: a number, the name of
    an C{int} parameter, or C{None}: one for a name, at least one for a pattern).
    """

    name: str
    media_type: str
    check: CheckKind = "media"
    count: int | str | None = None
    description: str = ""

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name

    def matches(self, name: str) -> bool:
        """Whether the file C{name} (relative to the output directory) is one of these."""
        if not self.is_pattern:
            return name == self.name
        # fnmatch's "*" crosses "/"; a pattern's "*" stays within one level.
        return name.count("/") == self.name.count("/") and fnmatch.fnmatchcase(name, self.name)

    def expected(self, params: Mapping[str, object]) -> tuple[int, int | None]:
        """How many files must match: at least, and at most (C{None}: no limit)."""
        if isinstance(self.count, int):
            return self.count, self.count
        if isinstance(self.count, str):
            value = params.get(self.count)
            n = value if isinstance(value, int) and not isinstance(value, bool) else 0
            return n, n
        return (1, 1) if not self.is_pattern else (1, None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "media_type": self.media_type,
            "check": self.check,
            "description": self.description,
        }
        if self.count is not None:
            out["count"] = self.count if isinstance(self.count, int) else f"{{{self.count}}}"
        return out


def parse_outputs(
    raw: object,
    parameters: Mapping[str, Parameter],
    error: Callable[[str | None, str], Exception],
) -> tuple[OutputSpec, ...]:
    """The C{outputs} key of a profile: a non-empty list of tables."""
    if not isinstance(raw, list) or not raw or not all(isinstance(o, dict) for o in raw):
        raise error("outputs", "must be a non-empty list of tables {name, media_type, ...}")
    specs: list[OutputSpec] = []
    for spec in raw:
        for key in spec:
            if key not in OUTPUT_KEYS:
                raise error(
                    "outputs", f"unknown key {key!r} (known: {', '.join(sorted(OUTPUT_KEYS))})"
                )
        name = spec.get("name")
        if not isinstance(name, str) or not _PATTERN.match(name) or ".." in name:
            raise error(
                "outputs",
                f"name {name!r}: a relative file name or pattern (letters, digits, _ . - *, "
                "at most four levels separated by /)",
            )
        media_type = spec.get("media_type", "application/octet-stream")
        if not isinstance(media_type, str) or not _MEDIA_TYPE.match(media_type):
            raise error("outputs", f"{name}: media_type must be a media type such as image/jpeg")
        check = spec.get("check", "media")
        if check not in CHECKS:
            raise error("outputs", f"{name}: check must be one of {', '.join(CHECKS)}")
        count = spec.get("count")
        if count is not None:
            if isinstance(count, str):
                m = _COUNT_PARAM.match(count)
                param = parameters.get(m.group(1)) if m else None
                if m is None or param is None or param.type != "int":
                    raise error("outputs", f"{name}: count {count!r} names no int parameter")
                count = m.group(1)
            elif not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise error("outputs", f"{name}: count must be a positive number or {{parameter}}")
        description = spec.get("description", "")
        if not isinstance(description, str):
            raise error("outputs", f"{name}: description must be a string")
        specs.append(OutputSpec(name, media_type, check, count, description))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise error("outputs", "two outputs have the same name")
    return tuple(specs)

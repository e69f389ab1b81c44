"""The C{jobs} and C{profiles} commands' tables, for people (C{--json} is for programs)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TextIO

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
JOB_COLUMNS = ("ID", "STATE", "PROGRESS", "PROFILE", "FILE", "CREATED")


def _clean(value: object) -> str:
    # A file name is the uploader's: no escape sequence of theirs reaches the terminal.
    return _CONTROL.sub("?", str(value))


def _created(value: object) -> str:
    """C{2026-11-27T00:33:38.484Z} -> C{2026-11-27 00:33:38} (UTC, as the server keeps it)."""
    text = str(value or "")
    return text[:19].replace("T", " ") if len(text) >= 19 else text or "-"


def job_row(job: Any) -> tuple[str, ...]:
    names = [str(i.get("filename") or i.get("name") or "") for i in job.inputs]
    return (
        job.id,
        job.state,
        f"{job.progress:.0f}%",
        job.profile,
        _clean("+".join(n for n in names if n) or "-"),
        _created(job.data.get("created_at")),
    )


def print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    out: TextIO,
    right: Sequence[int] = (),
) -> None:
    """Columns two spaces apart, as wide as their widest cell; those in C{right} to the right."""
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def print_jobs(jobs: Sequence[Any], out: TextIO) -> None:
    print_table(JOB_COLUMNS, [job_row(j) for j in jobs], out, right=(2,))


def _bounds(spec: dict[str, Any]) -> str:
    if "choices" in spec:
        return "|".join(str(c) for c in spec["choices"])
    low, high = spec.get("minimum"), spec.get("maximum")
    if low is not None or high is not None:
        return f"{'' if low is None else low}..{'' if high is None else high}"
    if spec.get("pattern"):
        return f"matching {spec['pattern']}"
    return ""


def print_profiles(profiles: Sequence[dict[str, Any]], out: TextIO) -> None:
    """Each profile: its name and description, inputs, outputs, then a line per parameter."""
    for n, profile in enumerate(profiles):
        if n:
            print(file=out)
        print(f"{profile.get('name')}: {_clean(profile.get('description') or '')}", file=out)
        needs = profile.get("needs") or {}
        inputs = [
            f"{i} (needs {'+'.join(needs[i])})" if needs.get(i) else str(i)
            for i in profile.get("inputs") or []
        ]
        print(f"  inputs: {', '.join(inputs) or '-'}", file=out)
        outputs = [str(o.get("name")) for o in profile.get("outputs") or []]
        print(f"  outputs: {', '.join(outputs) or '-'}", file=out)
        parameters = profile.get("parameters") or {}
        if not parameters:
            print("  parameters: none", file=out)
            continue
        rows = [
            (
                f"  {name}",
                str(spec.get("type", "")),
                str(spec.get("default")),
                _bounds(spec),
                _clean(spec.get("description") or ""),
            )
            for name, spec in parameters.items()
        ]
        print("  parameters:", file=out)
        print_table(("  NAME", "TYPE", "DEFAULT", "VALUES", "DESCRIPTION"), rows, out)

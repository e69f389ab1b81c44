"""
The shell blocks of the user docs, as the doc check (tests/test_doc_blocks.py) reads them.

The convention, for every doc this checks: shell commands go in ```sh blocks, and every
```sh block is run, in order, in one shell per doc.  A block that cannot run in a test
(it needs root, systemd, another machine, or serves in the foreground) has, on the line
right before its fence, a marker that says why:

    <!-- not run: writes /etc and needs root -->

Other shell labels (bash, console, shell, shell-session) are not used, so that no block
escapes the check by its label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = ("README.md", "docs/api.md", "docs/client.md", "docs/deployment.md")
OTHER_SHELL_LABELS = ("bash", "console", "shell", "shell-session", "zsh")

_FENCE = re.compile(r"^( *)```([\w-]*)[^\n]*\n(.*?)^\1```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:((?:(?!-->).)*)-->[ \t]*\n\Z", re.S)


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    label: str
    text: str
    # Why the block is not run; None when it is.
    not_run: str | None


def blocks(path: Path, doc: str) -> list[Block]:
    """Every fenced block of C{path}, with its label and its not-run marker, if any."""
    text = path.read_text()
    found = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()]
        marker = _NOT_RUN.search(before)
        body = m.group(3)
        if m.group(1):
            # An indented block (in a list item): its lines lose the indentation.
            indent = m.group(1)
            body = "".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in body.splitlines(keepends=True)
            )
        found.append(
            Block(
                doc=doc,
                line=text.count("\n", 0, m.start()) + 1,
                label=m.group(2),
                text=body,
                not_run=marker.group(1).strip() if marker else None,
            )
        )
    return found

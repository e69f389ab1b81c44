"""
The file name a server suggests for a download (C{Content-Disposition}), as
C{curl -OJ} uses it, made safe to create in the current directory: no
directory part, nothing hidden, no leading dash, no control characters.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# RFC 6266: filename*=UTF-8''<percent-encoded> wins over filename="...".
_EXTENDED = re.compile(r"""filename\*\s*=\s*([\w!#$%&+^`{}~-]+)'[^']*'([^;\s]+)""", re.I)
_QUOTED = re.compile(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', re.I)
_TOKEN = re.compile(r"filename\s*=\s*([^;\s\"]+)", re.I)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
# A file name's limit (255 bytes on Linux filesystems), less the ".part" the
# download is written to first (transcoder.client.fetch).
MAX_NAME = 255 - len(".part")


def disposition_filename(value: str) -> str | None:
    """The filename a C{Content-Disposition} value names, or None."""
    extended = _EXTENDED.search(value)
    if extended:
        charset, encoded = extended.groups()
        try:
            return unquote(encoded, encoding=charset, errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    quoted = _QUOTED.search(value)
    if quoted:
        return re.sub(r"\\(.)", r"\1", quoted.group(1))
    token = _TOKEN.search(value)
    return token.group(1) if token else None


def safe_filename(name: str | None) -> str | None:
    """
    C{name} as a file name in the current directory, or None if nothing
    usable is left: only its last path component (a server that says
    C{../../.bashrc} gets C{bashrc}), control characters replaced, no
    leading dots, dashes or spaces, at most L{MAX_NAME} bytes (cut at its
    start, so that the extension stays).
    """
    if not name:
        return None
    last = re.split(r"[/\\]", name)[-1]
    cleaned = _UNSAFE.sub("_", last).lstrip(".- ").rstrip(" ")
    if not cleaned or cleaned in (".", ".."):
        return None
    while len(cleaned.encode("utf-8")) > MAX_NAME:
        cleaned = cleaned[1:]
    # The cut may have bared a dot or a dash.
    return cleaned.lstrip(".- ") or None

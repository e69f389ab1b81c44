"""Client-supplied file names: kept for display and downloads, never used as paths."""

from __future__ import annotations

import re
import unicodedata

_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()+-]+")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")
MAX_NAME = 120


def sanitise_filename(raw: str | bytes | None, default: str = "upload") -> str:
    """
    A display name made only of safe characters: no directory part, no control
    or path characters, no leading dot, at most L{MAX_NAME} characters, the
    extension kept.  Never empty.
    """
    if raw is None:
        return default
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    # Browsers and curl send only the base name, but a hostile client may not.
    name = re.split(r"[/\\]", raw)[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    name = _UNSAFE.sub("_", name).strip(" ._")
    name = re.sub(r"_+", "_", name)
    if not name:
        return default
    if len(name) > MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        if dot and _EXT.match(ext.lower()):
            name = stem[: MAX_NAME - len(ext) - 1].rstrip(" ._") + "." + ext
        else:
            name = name[:MAX_NAME].rstrip(" ._")
    return name or default


def extension(name: str) -> str:
    """The lower-case extension of a sanitised name with its dot, or C{""} if it has none."""
    stem, dot, ext = name.rpartition(".")
    ext = ext.lower()
    return "." + ext if dot and stem and _EXT.match(ext) else ""


def content_disposition(filename: str) -> str:
    """An RFC 6266 attachment header value for an already sanitised name."""
    quoted = filename.replace("\\", "_").replace('"', "_")
    return f'attachment; filename="{quoted}"'

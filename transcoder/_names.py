"""Client-supplied file names: kept for display and downloads, never used as paths."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

_ASCII_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()+-]+")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")
MAX_NAME = 120
_PUNCTUATION = frozenset("._ ()+-")


def _safe(c: str) -> bool:
    # Letters, marks and digits of any script: a name is for display and
    # downloads, never a path.  Everything else (separators, controls,
    # direction overrides, other punctuation) becomes "_".
    return c in _PUNCTUATION or unicodedata.category(c)[0] in "LMN"


def sanitise_filename(raw: str | bytes | None, default: str = "upload") -> str:
    """
    A display name made only of safe characters (letters, marks and digits
    of any script, and C{._ ()+-}): no directory part, no control, format or
    path characters, no leading dot, NFC-normalised, at most L{MAX_NAME}
    characters, the extension kept.  Never empty.
    """
    if raw is None:
        return default
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    # Browsers and curl send only the base name, but a hostile client may not.
    name = re.split(r"[/\\]", raw)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(c if _safe(c) else "_" for c in name).strip(" ._")
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
    """
    An RFC 6266 attachment header value for an already sanitised name, all
    ASCII: a name in another script goes in C{filename*} (RFC 8187), with an
    ASCII C{filename} beside it for clients that know only that.
    """
    ext = extension(filename)
    stem = filename[: len(filename) - len(ext)]
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"_+", "_", _ASCII_UNSAFE.sub("_", stem)).strip(" ._")
    fallback = (stem or "download") + ext
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"

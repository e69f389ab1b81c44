"""Client-supplied file names: kept for display and downloads, never used as paths."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

_ASCII_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()+-]+")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")
MAX_NAME = 120
_PUNCTUATION = frozenset("._ ()+-")
# Saved under such a name, a file reads as an option ("-rf.mp4") or is hidden.
_LEAD = " ._-"
_TRAIL = " ._"
# Device names on Windows, whatever follows their first dot (and the spaces
# before it): a download saved as NUL.mp4 goes nowhere.
_RESERVED = re.compile(
    r"(?i)(CON|PRN|AUX|NUL|COM[1-9\u00b9\u00b2\u00b3]|LPT[1-9\u00b9\u00b2\u00b3])\Z"
)


def _safe(c: str) -> bool:
    # Letters, marks and digits of any script: a name is for display and
    # downloads, never a path.  Everything else (separators, controls,
    # direction overrides, other punctuation) becomes "_".
    return c in _PUNCTUATION or unicodedata.category(c)[0] in "LMN"


def sanitise_filename(raw: str | bytes | None, default: str = "upload") -> str:
    """
    A display name made only of safe characters (letters, marks and digits
    of any script, and C{._ ()+-}): no directory part, no control, format or
    path characters, no leading dot or dash, NFC-normalised, at most
    L{MAX_NAME} characters, the extension kept, never a Windows device name
    (C{NUL.mp4} becomes C{NUL_.mp4}).  Never empty.
    """
    if raw is None:
        return default
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    # Browsers and curl send only the base name, but a hostile client may not.
    name = re.split(r"[/\\]", raw)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(c if _safe(c) else "_" for c in name).lstrip(_LEAD).rstrip(_TRAIL)
    name = re.sub(r"_+", "_", name)
    if not name:
        return default
    if len(name) > MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        if dot and _EXT.match(ext.lower()):
            name = stem[: MAX_NAME - len(ext) - 1].rstrip(_TRAIL) + "." + ext
        else:
            name = name[:MAX_NAME].rstrip(_TRAIL)
    return _not_a_device(name or default)


def _not_a_device(name: str) -> str:
    base, dot, rest = name.partition(".")
    base = base.rstrip(" ")
    if not _RESERVED.match(base):
        return name
    renamed = base + "_" + dot + rest
    if len(renamed) > MAX_NAME:
        renamed = base + "_" + extension(name)
    return renamed


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
    stem = re.sub(r"_+", "_", _ASCII_UNSAFE.sub("_", stem)).lstrip(_LEAD).rstrip(_TRAIL)
    # Letters dropped for ASCII can leave a dash first, or a device name.
    fallback = _not_a_device((stem or "download") + ext)
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"

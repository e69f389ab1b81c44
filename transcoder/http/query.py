"""Query parameters that are numbers: their parsing and their 400s."""

from __future__ import annotations

import re

from twisted.web import server

from transcoder.http.errors import APIError
from transcoder.http.fields import query_arg


def bad_query(name: str, why: str) -> APIError:
    return APIError(400, "bad_query", f"query parameter {name!r} {why}")


def number_arg(request: server.Request, name: str, low: float, high: float) -> float | None:
    raw = query_arg(request.args or {}, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_query(name, "must be a number") from None
    if not low <= value <= high:
        raise bad_query(name, f"must be between {low:g} and {high:g}")
    return value


def int_arg(request: server.Request, name: str, low: int, high: int) -> int | None:
    raw = query_arg(request.args or {}, name)
    if raw is None:
        return None
    if not re.fullmatch(r"\d{1,9}", raw):
        raise bad_query(name, "must be a whole number")
    value = int(raw)
    if not low <= value <= high:
        raise bad_query(name, f"must be between {low} and {high}")
    return value

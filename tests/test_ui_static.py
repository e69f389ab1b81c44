"""
The web page's files as a real server sends them (issue 19), without a browser:
types, the Content-Security-Policy, no listing, the redirect of browsers from
C{/}, the page reachable without a token; and the page's HTML itself (no inline
script or style, a label for every control), and the vendored library's pin.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from serverproc import REPO, ServerProcess, serve
from test_api import Reply, conform

from transcoder.http.ui import STATIC, TYPES, load

TOKEN = "ui-static-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    where = tmp_path_factory.mktemp("ui-static")
    tokens = where / "tokens"
    tokens.write_text(f"web:{TOKEN}\n")
    proc = serve(where / "data", where / "server.log", "--tokens", str(tokens))
    yield proc
    proc.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_opener = urllib.request.build_opener(NoRedirect)


def get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with _opener.open(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_every_file_is_served_with_its_type_and_the_policy(server: ServerProcess) -> None:
    """Each file of the page answers 200 without a token, typed by its extension, with its exact bytes, a CSP of 'self' only and nosniff; HEAD gives the same head and no body."""
    files = load(STATIC)
    assert {"index.html", "app.js", "ui.css", "vendor/tus.min.js"} <= set(files)
    for name, found in files.items():
        status, headers, body = get(f"{server.url}/ui/{name}")
        assert status == 200, name
        assert headers["content-type"] == found.content_type.decode()
        assert body == (STATIC / name).read_bytes()
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "unsafe" not in policy and "http" not in policy and "*" not in policy
        assert headers["x-content-type-options"] == "nosniff"
        status, head, body = get(f"{server.url}/ui/{name}", method="HEAD")
        assert (status, body, head["content-length"]) == (200, b"", str(len(found.body)))


def test_the_page_is_index_html_and_revalidates(server: ServerProcess) -> None:
    """/ui/ is the page; its ETag gives 304 on a repeat; /ui redirects to /ui/, whose relative links need the slash."""
    status, headers, body = get(server.url + "/ui/")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    status, _, body = get(server.url + "/ui/", {"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")
    status, headers, _ = get(server.url + "/ui")
    assert (status, headers["location"]) == (301, "/ui/")


@pytest.mark.parametrize(
    "path", ["/ui/vendor/", "/ui/vendor", "/ui/nothing.js", "/ui/../jobs", "/ui/%2e%2e/tokens"]
)
def test_no_listing_and_nothing_else(server: ServerProcess, path: str) -> None:
    """A directory or a name that is not one of the page's files is a JSON 404 (still under the policy), never a listing or a file from elsewhere."""
    status, headers, body = get(server.url + path)
    assert status == 404
    assert json.loads(body)["error"]["code"] == "not_found"
    assert "content-security-policy" in headers


def test_browsers_are_sent_from_the_root_to_the_page(server: ServerProcess) -> None:
    """GET / with Accept: text/html (a browser) is a 302 to /ui/, token or none; an API client's / is as before (here: 401 without a token, the links with one)."""
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    status, headers, _ = get(server.url + "/", {"Accept": browser})
    assert (status, headers["location"]) == (302, "/ui/")
    assert "Accept" in headers["vary"]
    status, _, body = get(server.url + "/", {"Accept": "*/*"})
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    status, _, body = get(server.url + "/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["links"]["jobs"] == "/jobs"
    status, _, body = get(server.url + "/jobs", {"Accept": browser})
    assert status == 401


def test_unknown_extensions_stop_the_start(tmp_path: Path) -> None:
    """A file whose type is not known is refused at load, rather than served mistyped."""
    (tmp_path / "index.html").write_text("<!doctype html>")
    assert set(load(tmp_path)) == {"index.html"}
    (tmp_path / "notes.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no content type"):
        load(tmp_path)
    assert ".js" in TYPES


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.controls: list[str] = []
        self.labels: set[str] = set()
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
        if tag == "style" or "style" in a or any(k.startswith("on") for k in a):
            self.inline.append(tag)
        if tag in ("input", "select", "textarea"):
            self.controls.append(a.get("id") or "")
        if tag == "label" and a.get("for"):
            self.labels.add(a["for"] or "")
        for key in ("src", "href"):
            value = a.get(key) or ""
            if "//" in value or value.startswith("data:"):
                self.remote.append(value)


def test_the_page_has_no_inline_code_and_labels_every_control() -> None:
    """index.html loads its scripts from files (no inline script, style or handler), nothing from another host, and every control in it has a label."""
    page = _Page()
    page.feed((STATIC / "index.html").read_text())
    assert page.scripts and all(s.get("src") for s in page.scripts)
    assert page.inline == [] and page.remote == []
    assert page.controls and set(page.controls) <= page.labels
    script = (STATIC / "app.js").read_text()
    # The script builds controls with a label each, and never puts markup from strings in the page.
    assert "innerHTML" not in script and "eval(" not in script


def test_the_vendored_library_is_the_pinned_one() -> None:
    """The vendored tus-js-client is the version ui/package.json pins and the lockfile holds, and the README names that version and its licence."""
    pin = json.loads((REPO / "ui" / "package.json").read_text())["dependencies"]["tus-js-client"]
    lock = json.loads((REPO / "ui" / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/tus-js-client"]["version"] == pin
    assert (
        (STATIC / "vendor" / "tus-js-client.LICENSE.txt").read_text().startswith("The MIT License")
    )
    assert f"tus-js-client {pin}" in (REPO / "README.md").read_text()


def test_the_answers_are_the_specs(server: ServerProcess) -> None:
    """The page, a missing file and the root's redirect are what docs/openapi.yaml says."""
    browser = {"Accept": "text/html"}
    for path, headers in [
        ("/ui/", browser),
        ("/ui/nothing.js", {}),
        ("/", browser),
    ]:
        status, got, body = get(server.url + path, headers)
        conform("GET", path, Reply(status, got, body))

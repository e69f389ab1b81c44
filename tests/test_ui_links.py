"""
The web page's uploads over links that fail (issue 19), in Chromium driven by
Playwright against real servers on loopback: a file dropped on the drop zone,
the speed and time left of a slowed upload, the library's own resume after
the server cuts a PATCH (through a proxy in this process that drops one
connection mid-way), and Retry once its retries have run out against a
stopped server.  One browser for the module, as in tests/test_ui_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ffmpeg
from playwright.sync_api import Browser, Page, sync_playwright
from serverproc import ServerProcess, serve
from test_ui_browser import ARGS, CHROMIUM, Watched, api, job_card, named


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    where = tmp_path_factory.mktemp("ui-links")
    proc = serve(where / "data", where / "server.log", "--workers", "2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2.5 MB of H.264 (noisy frames): an upload that takes seconds when slowed."""
    path = tmp_path_factory.mktemp("ui-links-clips") / "linked clip.mp4"
    run_ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=2,noise=alls=60:allf=t",
        "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "8M", "-pix_fmt", "yuv420p",
        str(path),
    )  # fmt: skip
    return path


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Any]:
    contexts = []

    def opener(origin: str, clock: bool = False) -> Watched:
        context = browser.new_context(viewport={"width": 1000, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        if clock:
            # Timers the test can move on; until then time flows as usual.
            page.clock.install()
        w = Watched(page, origin)
        page.on("request", lambda r: w.requests.append(r))
        page.on("response", lambda r: w.responses.append(r))
        page.on("console", lambda m: w.console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: w.errors.append(str(e)))
        page.goto(origin + "/ui/")
        page.locator("#status", has_text="Ready.").wait_for()
        return w

    yield opener
    for context in contexts:
        context.close()


def slow(page: Page, bytes_per_second: int = 400_000) -> None:
    """Chromium's own network emulation: uploads go at C{bytes_per_second}."""
    conditions = {"offline": False, "latency": 20, "downloadThroughput": -1}
    page.context.new_cdp_session(page).send(
        "Network.emulateNetworkConditions", {**conditions, "uploadThroughput": bytes_per_second}
    )


def past(page: Page, percent: int) -> None:
    page.wait_for_function(
        f"() => document.querySelector('#uploads progress').value > {percent}", polling=50
    )


def resumed_patches(w: Watched) -> list[Any]:
    """The PATCHes the server took (204) at a non-zero offset."""
    return [
        r
        for r in w.responses
        if r.request.method == "PATCH"
        and int(r.request.headers.get("upload-offset", "0")) > 0
        and r.status == 204
    ]


def wait_offset(server: ServerProcess, path: str) -> int:
    """The upload's offset once the server has recorded some bytes of it."""
    head = urllib.request.Request(server.url + path, method="HEAD")
    head.add_header("Tus-Resumable", "1.0.0")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(head, timeout=10) as r:
            offset = int(r.headers["Upload-Offset"])
        if offset > 0:
            return offset
        time.sleep(0.05)
    raise AssertionError(f"{path}: no bytes recorded after the cut")


# The page's retry delays (app.js): after the first failure, one HEAD each.
RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000]


def check_resumed(w: Watched, server: ServerProcess, clip: Path) -> None:
    """
    The first PATCH broke off (failed, or refused at offset 0 when sent again), a HEAD
    then gave the server's offset, a PATCH from exactly there finished the upload, and
    the job's input has C{clip}'s sha256.
    """
    patches = [r for r in w.requests if r.method == "PATCH"]
    first = patches[0].response()
    assert patches[0].headers["upload-offset"] == "0"
    assert first is None or first.status == 409
    heads = [r.response() for r in w.requests if r.method == "HEAD" and "/uploads/" in r.url]
    offsets = {int(h.headers["upload-offset"]) for h in heads if h and h.status == 200}
    resumed = resumed_patches(w)
    assert resumed and int(resumed[0].request.headers["upload-offset"]) in offsets
    assert min(offsets) > 0
    location = resumed[-1].headers["job-location"]
    job = api(server, location)
    assert job["inputs"][0]["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()


UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
DETAIL = re.compile(
    r"^(?P<sent>[\d.]+ [KMG]?B) of (?P<total>[\d.]+ [KMG]?B)"
    r" · (?P<speed>[\d.]+ [KMG]?B)/s · (?P<left>(?:\d+ h )?(?:\d+ min )?\d+ s) left$"
)


def size(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


def seconds(text: str) -> int:
    total = 0
    for number, unit in re.findall(r"(\d+) (h|min|s)", text):
        total += int(number) * {"h": 3600, "min": 60, "s": 1}[unit]
    return total


# The dropped file's link, in bytes per second: its 3 MB take about 3 s.
LINK = 1_000_000
DROP = """([name, data]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const files = new DataTransfer();
    files.items.add(new File([bytes], name, { type: 'video/mp4' }));
    const zone = document.querySelector('.dropzone[data-role=file]');
    const event = (type) => new DragEvent(type, { dataTransfer: files, bubbles: true, cancelable: true });
    zone.dispatchEvent(event('dragenter'));
    // A zone that takes drops cancels dragover (else the browser would open the file).
    const taken = !zone.dispatchEvent(event('dragover'));
    const marked = zone.classList.contains('over');
    zone.dispatchEvent(event('drop'));
    return { taken, marked, unmarked: !zone.classList.contains('over') };
}"""


def test_a_dropped_file_goes_up_with_its_speed_and_time_left(
    server: ServerProcess, open_page: Any, clip: Path, tmp_path: Path
) -> None:
    """A file dropped on the drop zone (a DataTransfer made in the page from the clip's bytes) is uploaded and becomes a job that succeeds with the file's sha256; while it goes up slowed to 1 MB/s, its line shows the bytes sent of the total, a speed with a unit no faster than the emulated link, and a time left that falls."""
    dropped = named(clip, tmp_path, "dropped.mp4")
    data = dropped.read_bytes()
    w = open_page(server.url)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    slow(page, LINK)
    drop = page.evaluate(DROP, [dropped.name, base64.b64encode(data).decode("ascii")])
    assert drop == {"taken": True, "marked": True, "unmarked": True}
    detail = page.locator("#uploads li.upload .detail")
    seen = []
    for percent in (15, 60):
        past(page, percent)
        text = detail.text_content() or ""
        found = DETAIL.match(text)
        assert found, text
        seen.append(found)
    for found in seen:
        assert size(found["total"]) == pytest.approx(len(data), rel=0.01)
        assert 0 < size(found["speed"]) <= 1.5 * LINK
    assert size(seen[0]["sent"]) < size(seen[1]["sent"])
    assert seconds(seen[0]["left"]) > seconds(seen[1]["left"])
    card = job_card(page, dropped.name, "succeeded")
    card.wait_for()
    job = api(server, f"/jobs/{card.get_attribute('data-id')}")
    assert job["inputs"][0]["filename"] == dropped.name
    assert job["inputs"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    w.check()


class Proxy:
    """
    A TCP proxy on loopback in front of the server at C{port}: a link the test
    can break.  With C{cut_after}, the first connection whose client sends more
    than that many bytes is cut both ways at once, mid-request; L{down} cuts
    every connection and refuses new ones (a server gone, as the browser sees
    it) until L{up}.
    """

    def __init__(self, port: int, cut_after: int | None = None) -> None:
        self.port = port
        self.cut_after = cut_after
        self.cut = threading.Event()
        self._down = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._down:
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.port))
                self._sockets += [client, upstream]
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(*pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(*pair[::-1], False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                sent += len(data)
                if counted and self.cut_after is not None and sent > self.cut_after:
                    with self._lock:
                        cut_now = not self.cut.is_set()
                        self.cut.set()
                    if cut_now:
                        # What fits under the limit goes through, then both links break.
                        sink.sendall(data[: len(data) - (sent - self.cut_after)])
                        break
                sink.sendall(data)
        except OSError:
            pass
        _shut(source, sink)

    def down(self) -> None:
        with self._lock:
            self._down = True
            _shut(*self._sockets)
            self._sockets = []

    def up(self, port: int) -> None:
        with self._lock:
            self.port = port
            self._down = False

    def close(self) -> None:
        self.down()
        self._listener.close()


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def test_an_upload_resumes_by_itself_after_the_server_cuts_its_link(
    server: ServerProcess, open_page: Any, clip: Path, tmp_path: Path
) -> None:
    """With the browser online all along, the connection carrying the upload's PATCH is cut after 1 MB (a proxy between the page and the server breaks it both ways): tus-js-client asks the server's offset (HEAD) and sends the rest from there (a PATCH at a non-zero offset that the server takes) with no action from the user, and the job's input has the file's sha256."""
    cut = named(clip, tmp_path, "cut.mp4")
    proxy = Proxy(server.port, cut_after=1_000_000)
    try:
        w = open_page(proxy.url)
        page = w.page
        page.select_option("select[name=profile]", "mp4-h264")
        page.set_input_files("#file-file", cut)
        card = job_card(page, cut.name, "succeeded")
        card.wait_for()
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    check_resumed(w, server, cut)
    assert page.locator("#uploads li.upload").get_attribute("data-state") == "done"
    # Chromium may send the cut PATCH again by itself on a new connection (its connection
    # had served a request before), which the server refuses at offset 0 (409).
    w.check("409 (Conflict)", "net::ERR_")


def test_retry_after_the_retries_run_out_goes_on_from_the_servers_offset(
    open_page: Any, clip: Path, tmp_path: Path
) -> None:
    """The server goes away mid-upload while the browser stays online (the link to it is cut, then it is stopped): the page's own retries (0, 1, 3, 5, 10 and 20 s, moved on by the page's clock) all fail, and the upload is shown failed, saying the server cannot be reached, with a Retry button; with a server started again on the same data dir, Retry asks its offset (HEAD) and sends the rest from there, not from 0, and the job's input has the file's sha256."""
    retried = named(clip, tmp_path, "retried after a restart.mp4")
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    first = serve(data_dir, log)
    proxy = Proxy(first.port)
    server = None
    try:
        w = open_page(proxy.url, clock=True)
        page = w.page
        page.select_option("select[name=profile]", "mp4-h264")
        slow(page, LINK)
        page.set_input_files("#file-file", retried)
        past(page, 20)
        # The link goes first, so that the server records what the cut PATCH brought (on
        # SIGTERM it would take the whole PATCH first; after SIGKILL, none of it).
        proxy.down()
        patch = next(r for r in w.requests if r.method == "PATCH")
        kept = wait_offset(first, patch.url.removeprefix(proxy.url))
        assert first.stop() == 0
        while sum(r.method == "HEAD" and bool(r.failure) for r in w.requests) < len(RETRY_DELAYS):
            # Each jump fires the retry timer due, if one is; its HEAD fails at once.
            page.clock.fast_forward(30_000)
            page.wait_for_timeout(100)
        upload = page.locator("#uploads li.upload")
        upload.and_(page.locator("[data-state=failed]")).wait_for()
        detail = upload.locator(".detail").text_content()
        assert detail == "failed: the server cannot be reached; Retry once it is back"
        server = serve(data_dir, log.with_suffix(".again"))
        proxy.up(server.port)
        upload.get_by_role("button", name=re.compile("^Retry")).click()
        job_card(page, retried.name, "succeeded").wait_for()
        check_resumed(w, server, retried)
        assert int(resumed_patches(w)[0].request.headers["upload-offset"]) == kept
        w.check("net::ERR_")
    finally:
        proxy.close()
        first.stop()
        if server is not None:
            server.stop()

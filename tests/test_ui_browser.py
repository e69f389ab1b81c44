"""
The web page (issue 19) in a real browser: Debian's Chromium driven by
Playwright, against a real server on loopback.  One browser for the module,
a fresh context (storage, cookies) per test; every test checks that no request
left the server and that the page logged no error.

Playwright's sync API runs here, in plain test functions: the server is
another process, so its loop and the reactor never share a thread.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Clips, run_ffmpeg
from playwright.sync_api import Browser, Page, Request, Response, sync_playwright
from serverproc import ServerProcess, serve

CHROMIUM = "/usr/bin/chromium"
# --no-sandbox: the tests run as root; the rest keeps Chromium from calling home.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TOKEN = "browser-secret-1"
# Long enough for a job to be seen running and cancelled: H.264 at the clip's own pace.
PACED = """
[paced]
description = "H.264 in MP4, reading the input at its native rate: a job lasts as long as its clip."
executable = "ffmpeg"
argv = [
    "-nostdin", "-y", "-nostats", "-progress", "pipe:1", "-re", "-i", "{file}",
    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", "-f", "mp4",
    "{output}",
]
output_extension = "mp4"
media_type = "video/mp4"
progress = "ffmpeg"
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _serve(where: Path, *extra: str) -> ServerProcess:
    profiles = where / "paced.toml"
    profiles.write_text(PACED)
    return serve(where / "data", where / "server.log", "--profiles", str(profiles), *extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = _serve(tmp_path_factory.mktemp("ui-browser"), "--workers", "2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def big_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2.5 MB of H.264 (noisy frames at a high rate): an upload that takes seconds when slowed."""
    path = tmp_path_factory.mktemp("ui-clips") / "big clip.mp4"
    run_ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=2,noise=alls=60:allf=t",
        "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "8M", "-pix_fmt", "yuv420p",
        str(path),
    )  # fmt: skip
    return path


@dataclass
class Watched:
    """A page and what it did: every request, console errors and uncaught exceptions."""

    page: Page
    origin: str
    requests: list[Request] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def check(self, *allowed: str) -> None:
        """Nothing left the server, nothing was thrown, no console error but the C{allowed} ones."""
        foreign = [r.url for r in self.requests if not r.url.startswith(self.origin + "/")]
        assert foreign == []
        assert self.errors == []
        assert [m for m in self.console if not any(a in m for a in allowed)] == []


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Any]:
    contexts = []

    def opener(server: ServerProcess, width: int = 1000) -> Watched:
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        w = Watched(page, server.url)
        page.on("request", lambda r: w.requests.append(r))
        page.on("response", lambda r: w.responses.append(r))
        page.on("console", lambda m: w.console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: w.errors.append(str(e)))
        page.goto(server.url + "/")
        return w

    yield opener
    for context in contexts:
        context.close()


def api(server: ServerProcess, path: str, method: str = "GET", body: bytes | None = None) -> Any:
    request = urllib.request.Request(server.url + path, data=body, method=method)
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read()) if r.status != 204 else None


def put_job(server: ServerProcess, clip: Path, profile: str) -> dict[str, Any]:
    """A job made the old way (curl -T), for the page to find."""
    path = f"/jobs?profile={profile}&filename={clip.name}"
    job: dict[str, Any] = api(server, path, "PUT", clip.read_bytes())
    return job


def named(clip: Path, where: Path, name: str) -> Path:
    """A copy of C{clip} as C{name}: the module's server is shared, and cards are found by name."""
    copy = where / name
    copy.write_bytes(clip.read_bytes())
    return copy


def job_card(page: Page, name: str, state: str = "") -> Any:
    where = f'#jobs li.job[data-state="{state}"]' if state else "#jobs li.job"
    return page.locator(where, has=page.locator("h3", has_text=name))


def test_a_clip_goes_up_and_its_result_comes_down(
    server: ServerProcess, open_page: Any, clips: Clips, tmp_path: Path
) -> None:
    """At phone width (nothing wider than 360 px): choose a profile, set a parameter, give a clip to the file field; the upload finishes, the job reaches succeeded, and its result link downloads exactly the job's result."""
    clip = named(clips.av, tmp_path, "first clip.mp4")
    w = open_page(server, width=360)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    page.get_by_label("crf", exact=True).fill("30")
    page.set_input_files("#file-file", clip)
    card = job_card(page, clip.name, "succeeded")
    card.wait_for()
    job_id = card.get_attribute("data-id")
    job = api(server, f"/jobs/{job_id}")
    assert job["params"]["crf"] == 30 and job["inputs"][0]["filename"] == clip.name
    assert job["inputs"][0]["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    with page.expect_download() as download:
        card.get_by_role("link", name=re.compile("Download the result")).click()
    got = Path(download.value.path()).read_bytes()
    assert hashlib.sha256(got).hexdigest() == job["output"]["sha256"]
    assert download.value.suggested_filename == clip.stem + ".mp4"
    card.get_by_text("Encoder log").click()
    card.locator("pre.log", has_text="ffmpeg").wait_for()
    assert page.locator("#uploads li.upload[data-state=done]").count() == 1
    # Readable at 360 px: nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    # TRANSCODER_UI_SCREENSHOT=docs/ui.png makes the README's picture.
    shot = Path(os.environ.get("TRANSCODER_UI_SCREENSHOT") or tmp_path / "ui.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    w.check()


def test_mux_avi_takes_one_file_per_input(
    server: ServerProcess, open_page: Any, clips: Clips
) -> None:
    """Every control of every profile's form has a label; mux-avi shows a file field for each of its inputs, and a video and an audio file uploaded through them make one job that succeeds with an AVI of both."""
    w = open_page(server)
    page = w.page
    page.select_option("select[name=profile]", "mux-avi")
    assert page.locator("#input-fields input[type=file]").count() == 2
    for profile in ("mp4-h264", "hls", "mux-avi"):
        page.select_option("select[name=profile]", profile)
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input, select')].filter(e => !e.labels.length).map(e => e.id)"
        )
        assert unlabelled == [], profile
    page.get_by_label("Video file").set_input_files(clips.flv_video)
    page.get_by_label("Audio file").set_input_files(clips.mp3_audio)
    card = job_card(page, clips.flv_video.name, "succeeded")
    card.wait_for()
    job = api(server, f"/jobs/{card.get_attribute('data-id')}")
    assert job["profile"] == "mux-avi"
    assert {i["name"]: i["filename"] for i in job["inputs"]} == {
        "video": clips.flv_video.name,
        "audio": clips.mp3_audio.name,
    }
    assert job["output"]["media_type"] == "video/x-msvideo"
    w.check()


def test_cancel_a_running_job_and_the_list_survives_a_reload(
    server: ServerProcess, open_page: Any, clips: Clips, tmp_path: Path
) -> None:
    """The token's jobs are listed newest first with name, profile, state, progress and created time, and still after a reload; a failed job shows its error; Cancel on a running job stops and removes it on the server."""
    noise = named(clips.noise, tmp_path, "noise.mp4")
    long = named(clips.av_long, tmp_path, "long.mp4")
    broken = put_job(server, noise, "mp4-h264")
    older = put_job(server, named(clips.av, tmp_path, "older.mp4"), "mp4-h264")
    running = put_job(server, long, "paced")
    w = open_page(server)
    page = w.page
    card = job_card(page, long.name, "running")
    card.wait_for()
    page.reload()
    card.wait_for()
    ids = page.locator("#jobs li.job").evaluate_all("cards => cards.map(c => c.dataset.id)")
    assert ids.index(running["id"]) < ids.index(older["id"])
    assert card.locator(".profile").text_content() == "paced"
    assert card.locator("time").get_attribute("datetime") == running["created_at"]
    failed = job_card(page, noise.name, "failed")
    failed.wait_for()
    error = api(server, f"/jobs/{broken['id']}")["error"]["message"]
    assert failed.get_by_role("alert").text_content() == "Failed: " + error
    card.get_by_role("button", name=re.compile("^Cancel the job")).click()
    card.wait_for(state="detached")
    with pytest.raises(urllib.error.HTTPError) as gone:
        api(server, f"/jobs/{running['id']}")
    assert gone.value.code == 404
    w.check()


def test_an_upload_resumes_after_the_link_drops(
    server: ServerProcess, open_page: Any, big_clip: Path
) -> None:
    """With the upload slowed by network emulation, the page goes offline mid-upload (the page stops the PATCH under way, as a dead link would) and back: the upload goes on by itself from the server's offset (a HEAD, then a PATCH at a non-zero offset the server accepts), and the job's input has the file's sha256."""
    w = open_page(server)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    cdp = page.context.new_cdp_session(page)
    slow = {"offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": 400_000}
    cdp.send("Network.emulateNetworkConditions", slow)
    page.set_input_files("#file-file", big_clip)
    upload = page.locator("#uploads li.upload")
    page.wait_for_function(
        "() => document.querySelector('#uploads progress').value > 20", polling=100
    )
    page.context.set_offline(True)
    upload.and_(page.locator("[data-state=offline]")).wait_for()
    page.context.set_offline(False)
    card = job_card(page, big_clip.name, "succeeded")
    card.wait_for()
    heads = [r for r in w.requests if r.method == "HEAD" and "/uploads/" in r.url]
    resumed = [
        r
        for r in w.responses
        if r.request.method == "PATCH"
        and int(r.request.headers.get("upload-offset", "0")) > 0
        and r.status == 204
    ]
    assert heads and resumed
    upload_path = heads[0].url.removeprefix(server.url)
    assert f'"HEAD {upload_path} HTTP/1.1" 200' in server.output
    job = api(server, f"/jobs/{card.get_attribute('data-id')}")
    assert job["inputs"][0]["sha256"] == hashlib.sha256(big_clip.read_bytes()).hexdigest()
    w.check("net::ERR_INTERNET_DISCONNECTED")


def _slow(page: Page, bytes_per_second: int = 400_000) -> None:
    cdp = page.context.new_cdp_session(page)
    conditions = {"offline": False, "latency": 20, "downloadThroughput": -1}
    cdp.send(
        "Network.emulateNetworkConditions", {**conditions, "uploadThroughput": bytes_per_second}
    )


def _past(page: Page, percent: int) -> None:
    page.wait_for_function(
        f"() => document.querySelector('#uploads progress').value > {percent}", polling=100
    )


def test_an_upload_is_paused_resumed_and_cancelled(
    server: ServerProcess, open_page: Any, big_clip: Path
) -> None:
    """Pause stops an upload and Resume goes on from the server's offset; Cancel terminates it on the server (DELETE), whose HEAD then finds nothing."""
    w = open_page(server)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    _slow(page)
    page.set_input_files("#file-file", big_clip)
    upload = page.locator("#uploads li.upload")
    _past(page, 10)
    upload.get_by_role("button", name=re.compile("^Pause")).click()
    upload.and_(page.locator("[data-state=paused]")).wait_for()
    upload.get_by_role("button", name=re.compile("^Resume")).click()
    _past(page, 30)
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        upload.get_by_role("button", name=re.compile("^Cancel")).click()
    upload.and_(page.locator("[data-state=cancelled]")).wait_for()
    assert deleted.value.status == 204
    resumed = [
        r for r in w.requests if r.method == "PATCH" and r.headers.get("upload-offset") != "0"
    ]
    assert resumed
    head = urllib.request.Request(
        deleted.value.url, method="HEAD", headers={"Tus-Resumable": "1.0.0"}
    )
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(head, timeout=10)
    assert gone.value.code in (404, 410)
    w.check("net::ERR_ABORTED")


def test_the_same_file_for_two_jobs_is_two_uploads(
    server: ServerProcess, open_page: Any, big_clip: Path, tmp_path: Path
) -> None:
    """The same file chosen again for another profile while its first upload is still going is an upload of its own (a second POST /uploads), not the first one resumed under the first one's profile: two jobs, one of each profile, each with the file's sha256."""
    clip = named(big_clip, tmp_path, "twice.mp4")
    w = open_page(server)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    _slow(page)
    page.set_input_files("#file-file", clip)
    _past(page, 10)
    page.select_option("select[name=profile]", "paced")
    page.set_input_files("#file-file", clip)
    page.locator("#uploads li.upload").nth(1).wait_for()
    _slow(page, -1)
    cards = job_card(page, clip.name, "succeeded")
    cards.nth(1).wait_for()
    ids = cards.evaluate_all("cards => cards.map(c => c.dataset.id)")
    jobs = [api(server, f"/jobs/{job_id}") for job_id in ids]
    assert sorted(job["profile"] for job in jobs) == ["mp4-h264", "paced"]
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()
    assert [job["inputs"][0]["sha256"] for job in jobs] == [digest, digest]
    created = [r for r in w.requests if r.method == "POST" and r.url.endswith("/uploads")]
    assert len(created) == 2
    w.check()


def test_a_failed_upload_says_why_and_retry_starts_it_again(
    server: ServerProcess, open_page: Any, clips: Clips, tmp_path: Path
) -> None:
    """An upload the server refuses shows the server's message and a Retry button; Retry starts it again, and it goes through."""
    clip = named(clips.av, tmp_path, "retried.mp4")
    w = open_page(server)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    refusal = {"error": {"code": "queue_full", "message": "the queue is full; retry later"}}
    # The first creation is refused (a 4xx: tus-js-client does not retry it by itself).
    page.route(
        "**/uploads",
        lambda route: route.fulfill(status=403, json=refusal),
        times=1,
    )
    page.set_input_files("#file-file", clip)
    upload = page.locator("#uploads li.upload")
    upload.and_(page.locator("[data-state=failed]")).wait_for()
    assert upload.locator(".detail").text_content() == "failed: the queue is full; retry later"
    upload.get_by_role("button", name=re.compile("^Retry")).click()
    job_card(page, clip.name, "succeeded").wait_for()
    assert upload.get_attribute("data-state") == "done"
    w.check("403 (Forbidden)")


def test_a_reload_offers_to_resume_an_upload(
    server: ServerProcess, open_page: Any, big_clip: Path, tmp_path: Path
) -> None:
    """Uploads cut short by a reload are listed after it as unfinished (their URLs kept in localStorage); Forget terminates one on the server; choosing the other's file again resumes it from the server's offset, and the job's input has the file's sha256."""
    w = open_page(server)
    page = w.page
    page.select_option("select[name=profile]", "mp4-h264")
    _slow(page)
    # Names of their own, so that no other test's upload of the same file is offered.
    clip = named(big_clip, tmp_path, "reloaded.mp4")
    other = named(big_clip, tmp_path, "forgotten.mp4")
    page.set_input_files("#file-file", [clip, other])
    _past(page, 20)
    page.reload()
    offered = page.locator("#resumable-list li", has_text=clip.name)
    offered.wait_for()
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.get_by_role("button", name=f"Forget the unfinished upload of {other.name}").click()
    assert deleted.value.status == 204
    page.locator("#resumable-list li", has_text=other.name).wait_for(state="detached")
    page.select_option("select[name=profile]", "mp4-h264")
    page.set_input_files("#file-file", clip)
    job_card(page, clip.name, "succeeded").wait_for()
    resumed = [
        r
        for r in w.responses
        if r.request.method == "PATCH"
        and int(r.request.headers.get("upload-offset", "0")) > 0
        and r.status == 204
    ]
    assert (
        resumed
        and len([r for r in w.requests if r.method == "POST" and r.url.endswith("/uploads")]) == 2
    )
    job = api(server, f"/jobs/{job_card(page, clip.name).get_attribute('data-id')}")
    assert job["inputs"][0]["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert page.locator("#resumable").is_hidden()
    w.check("net::ERR_ABORTED")


def test_a_token_is_asked_for_and_a_wrong_one_refused(
    browser: Browser, open_page: Any, tmp_path: Path, clips: Clips
) -> None:
    """With --tokens the page asks for a token, says so when it is wrong, and with the right one (typed and sent from the keyboard) lists that token's jobs, uploads and downloads; the token travels as a Bearer header only, never in a URL."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"web:{TOKEN}\n")
    server = _serve(tmp_path, "--tokens", str(tokens))
    try:
        request = urllib.request.Request(
            server.url + f"/jobs?profile=mp4-h264&filename={clips.av.name}",
            data=clips.av.read_bytes(),
            method="PUT",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            job = json.loads(r.read())
        w = open_page(server)
        page = w.page
        message = page.locator("#token-message")
        message.filter(has_text="needs a token").wait_for()
        assert page.locator("#new-section").is_hidden()
        page.get_by_label("API token").fill("not-the-token")
        page.get_by_role("button", name="Use this token").click()
        message.filter(has_text="not valid").wait_for()
        # By keyboard: the field has the focus again, Enter sends it.
        assert page.evaluate("document.activeElement.id") == "token"
        page.keyboard.type(TOKEN)
        page.keyboard.press("Enter")
        job_card(page, clips.av.name).wait_for()
        assert page.locator("#token-section").is_hidden()
        assert page.locator("#jobs li.job").get_attribute("data-id") == job["id"]
        # An upload and a download with the token: tus sends the header, the result comes
        # through the page (a link cannot carry it).
        page.select_option("select[name=profile]", "mp4-h264")
        page.set_input_files("#file-file", clips.flv_video)
        card = job_card(page, clips.flv_video.name, "succeeded")
        card.wait_for()
        with page.expect_download() as download:
            card.get_by_role("link", name=re.compile("Download the result")).click()
        got = Path(download.value.path()).read_bytes()
        assert download.value.suggested_filename == clips.flv_video.stem + ".mp4"
        request = urllib.request.Request(
            server.url + f"/jobs/{card.get_attribute('data-id')}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert hashlib.sha256(got).hexdigest() == json.loads(r.read())["output"]["sha256"]
        # Asked once: a reload of the tab keeps the token (sessionStorage, never
        # localStorage); a new browser session asks again.
        page.reload()
        job_card(page, clips.flv_video.name, "succeeded").wait_for()
        assert page.locator("#token-section").is_hidden()
        kept = "[sessionStorage, localStorage].map(s => Object.values(s).some(v => v.includes(t)))"
        assert page.evaluate(f"(t) => {kept}", TOKEN) == [True, False]
        again = open_page(server)
        again.page.locator("#token-message").filter(has_text="needs a token").wait_for()
        again.check("401 (Unauthorized)")
        for part in ("/jobs", "/uploads", "/profiles"):
            sent = {r.headers.get("authorization") for r in w.requests if part in r.url}
            assert f"Bearer {TOKEN}" in sent, part
        assert not any(TOKEN in r.url or "not-the-token" in r.url for r in w.requests)
        w.check("401 (Unauthorized)")
    finally:
        server.stop()


def test_the_page_works_from_the_keyboard_and_long_polls(
    server: ServerProcess, open_page: Any, big_clip: Path, tmp_path: Path
) -> None:
    """At 360 px: Tab goes through the profile and its fields to the file input, Space there activates it (the click that opens the file chooser); the next Tab is the upload's Pause button, Enter pauses it and leaves the focus on Resume, Enter resumes it; nothing is wider than the screen while the upload's buttons show.  The job is then followed by long-poll: every request for it after the first waits (?wait=30), and every answer brings a change (no polling)."""
    clip = named(big_clip, tmp_path, "keyboard.mp4")
    w = open_page(server, width=360)
    page = w.page
    page.locator("#status", has_text="Ready.").wait_for()
    page.select_option("select[name=profile]", "mp4-h264")
    # The profile's fields and file input are built anew on a change: tab through
    # the new ones, not ones about to be replaced.
    page.locator("#param-crf").wait_for()
    page.locator("#file-file").wait_for()
    _slow(page, 1_000_000)
    page.evaluate("document.activeElement.blur()")
    order = []
    while not order or order[-1] != "file-file":
        assert len(order) < 30, order
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order.index("profile") < order.index("param-crf") < order.index("file-file")
    assert page.evaluate("document.activeElement.id") == "file-file"
    # Space activates the focused file input (the click that opens the chooser).
    # Seen as that click, its default prevented: headless Chromium's chooser
    # event did not always come in a full run.
    page.evaluate(
        """() => document.getElementById('file-file').addEventListener('click', e => {
            window.spaceClicked = true; e.preventDefault(); }, {once: true})"""
    )
    page.keyboard.press("Space")
    page.wait_for_function("window.spaceClicked === true", timeout=20_000)
    assert page.evaluate("document.activeElement.id") == "file-file"
    page.set_input_files("#file-file", clip)
    upload = page.locator("#uploads li.upload")
    upload.and_(page.locator("[data-state=uploading]")).wait_for()
    focused = "document.activeElement.className"
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "pause"
    page.keyboard.press("Enter")
    upload.and_(page.locator("[data-state=paused]")).wait_for()
    assert page.evaluate(focused) == "resume"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.keyboard.press("Enter")
    assert page.evaluate(focused) == "pause"
    card = job_card(page, clip.name, "succeeded")
    card.wait_for()
    job = f"{server.url}/jobs/{card.get_attribute('data-id')}"
    answers = [r for r in w.responses if r.url.split("?")[0] == job]
    assert [r.url.removeprefix(job) for r in answers[1:]] == ["?wait=30"] * (len(answers) - 1)
    seen = [(a["state"], a["progress"]) for a in (r.json() for r in answers)]
    assert all(a != b for a, b in itertools.pairwise(seen)), seen
    assert seen[-1][0] == "succeeded"
    w.check("net::ERR_ABORTED")


def test_retry_after_a_new_token_sends_it_and_a_download_keeps_a_unicode_name(
    open_page: Any, tmp_path: Path, clips: Clips
) -> None:
    """An upload whose token stops being accepted fails and the page asks for another; after a new one is entered, Retry sends the new one (not the one the upload started with) and the upload goes through; the result, fetched with the token, is saved under its UTF-8 name (filename*), not the ASCII fallback."""
    old, new = "browser-old-1", "browser-new-2"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"web:{old}\nweb:{new}\n")
    server = _serve(tmp_path, "--tokens", str(tokens))
    clip = named(clips.flv_video, tmp_path, "clïp ünï.flv")
    try:
        w = open_page(server)
        page = w.page
        page.get_by_label("API token").fill(old)
        page.get_by_role("button", name="Use this token").click()
        page.locator("#new-section").wait_for()
        revoked = {"error": {"code": "invalid_token", "message": "the token is no longer valid"}}

        def refuse_the_old_token(route: Any) -> None:
            # The upload is created with the old token, which is then refused: as if revoked.
            request = route.request
            if request.method != "POST" and request.headers.get("authorization") == f"Bearer {old}":
                route.fulfill(status=401, json=revoked)
            else:
                route.continue_()

        page.route(lambda url: "/uploads" in url, refuse_the_old_token)
        page.select_option("select[name=profile]", "mp4-h264")
        page.set_input_files("#file-file", clip)
        upload = page.locator("#uploads li.upload")
        # Failed, and out of sight with the rest of the form while the page asks for a token.
        upload.and_(page.locator("[data-state=failed]")).wait_for(state="attached")
        page.locator("#token-message").filter(has_text="not valid").wait_for()
        before = len(w.requests)
        page.get_by_label("API token").fill(new)
        page.get_by_role("button", name="Use this token").click()
        page.locator("#new-section").wait_for()
        upload.get_by_role("button", name=re.compile("^Retry")).click()
        card = job_card(page, clip.name, "succeeded")
        card.wait_for()
        sent = {r.headers.get("authorization") for r in w.requests[before:] if "/uploads" in r.url}
        assert sent == {f"Bearer {new}"}
        with page.expect_download() as download:
            card.get_by_role("link", name=re.compile("Download the result")).click()
        assert download.value.suggested_filename == "clïp ünï.mp4"
        w.check("401 (Unauthorized)")
    finally:
        server.stop()

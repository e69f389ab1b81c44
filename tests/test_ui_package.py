"""
The web page's files as they ship (issue 19): C{make vendor} refreshes the
vendored tus-js-client from the tarball ui/package-lock.json pins, and the
wheel carries every file of the page.  No network: npm runs offline, from
its cache, and the wheel is built without build isolation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from serverproc import REPO

from transcoder.http.ui import STATIC, load

VENDOR = STATIC / "vendor"
VENDORED = ["tus.min.js", "tus.min.js.map", "tus-js-client.LICENSE.txt"]


def make_vendor(where: Path, lock: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """C{make vendor} in a copy of the checkout's parts it uses, npm kept offline."""
    (where / "ui").mkdir(parents=True)
    (where / "transcoder/http/ui/static/vendor").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", where)
    shutil.copy(REPO / "ui/package.json", where / "ui")
    (where / "ui/package-lock.json").write_text(json.dumps(lock, indent=2))
    env = {**os.environ, "npm_config_offline": "true", "npm_config_update_notifier": "false"}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(where), "vendor"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def test_make_vendor_gives_the_vendored_files_from_the_locked_tarball(tmp_path: Path) -> None:
    """`make vendor` (npm ci from ui/package-lock.json, offline from npm's cache) gives byte for byte the committed tus.min.js, its map and its licence, and removes its node_modules; a lockfile whose integrity for tus-js-client is another tarball's makes it fail (EINTEGRITY) and vendor nothing, so the pinned integrity is checked."""
    lock = json.loads((REPO / "ui/package-lock.json").read_text())
    pin = json.loads((REPO / "ui/package.json").read_text())["dependencies"]["tus-js-client"]
    locked = lock["packages"]["node_modules/tus-js-client"]
    assert locked["version"] == pin
    # make test's `npm ci` in tests/js installs the same tree, which fills npm's cache with
    # exactly these tarballs: that is where the offline `make vendor` here finds them.
    tests_lock = json.loads((REPO / "tests/js/package-lock.json").read_text())
    assert {k: v for k, v in tests_lock["packages"].items() if k} == {
        k: v for k, v in lock["packages"].items() if k
    }
    done = make_vendor(tmp_path / "good", lock)
    assert done.returncode == 0, (
        done.stdout + done.stderr + "\n(npm's cache needs tests/js's npm ci)"
    )
    made = tmp_path / "good/transcoder/http/ui/static/vendor"
    assert sorted(p.name for p in made.iterdir()) == sorted(VENDORED)
    for name in VENDORED:
        assert (made / name).read_bytes() == (VENDOR / name).read_bytes(), name
    assert not (tmp_path / "good/ui/node_modules").exists()

    other = hashlib.sha512(b"another tarball").digest()
    locked["integrity"] = "sha512-" + base64.b64encode(other).decode("ascii")
    refused = make_vendor(tmp_path / "bad", lock)
    assert refused.returncode != 0
    assert "EINTEGRITY" in refused.stdout + refused.stderr
    assert list((tmp_path / "bad/transcoder/http/ui/static/vendor").iterdir()) == []


def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    """A wheel built from the sources holds every file of the page, and the package installed from it finds them (importlib.resources, and the server's own loader) with the same bytes."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("transcoder", "twisted/plugins"):
        shutil.copytree(REPO / part, src / part, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("transcoder-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    script = (
        "import json, importlib.resources as r; import transcoder.http.ui as ui\n"
        "files = ui.load(ui.STATIC)\n"
        "page = r.files('transcoder.http.ui').joinpath('static/index.html').read_bytes()\n"
        "print(json.dumps({'static': str(ui.STATIC), 'page': page.decode(),\n"
        "    'files': {k: f.etag.decode() for k, f in files.items()}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=60, check=True,
    )  # fmt: skip
    found = json.loads(ran.stdout)
    assert Path(found["static"]).is_relative_to(site)
    assert found["page"] == (STATIC / "index.html").read_text()
    assert found["files"] == {k: f.etag.decode() for k, f in load(STATIC).items()}

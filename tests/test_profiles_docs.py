"""
docs/profiles.md is true: its worked examples, loaded straight out of the
page, run on a real server with real encoders; `transcoder submit --param`
sets a built-in's height; and `transcoder serve --profiles` with a wrong
file exits before it listens, naming the file, the profile and the key.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from serverproc import LISTEN, ServerProcess, serve, transcoder

from transcoder.client.cli import EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE
from transcoder.core.profiles import ProfileError, builtin_profiles, load_profiles, parse_profiles

if TYPE_CHECKING:
    from conftest import Clips

DOC = Path(__file__).resolve().parent.parent / "docs" / "profiles.md"
FfprobeJson = Callable[[Path], dict[str, Any]]


def toml_blocks() -> list[str]:
    """Every ```toml block of docs/profiles.md, in order."""
    return re.findall(r"^```toml\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)


def _cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCODER_")}
    env["TRANSCODER_URL"] = server.url
    return subprocess.run(
        [transcoder(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _streams(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in doc["streams"] if s["codec_type"] == kind]


def test_the_examples_are_the_two_the_page_promises() -> None:
    """The page's TOML blocks are the thumbnails built-in (as stills), the resize and the two-input mux, each a valid profiles file."""
    blocks = toml_blocks()
    assert [list(parse_profiles(b)) for b in blocks] == [["stills"], ["resize"], ["mux-mkv"]]
    stills, thumbnails = parse_profiles(blocks[0])["stills"], builtin_profiles()["thumbnails"]
    assert stills.argv == thumbnails.argv
    assert [(o.name, o.check, o.count) for o in stills.outputs] == [
        (o.name, o.check, o.count) for o in thumbnails.outputs
    ]
    mux = parse_profiles(blocks[2])["mux-mkv"]
    assert mux.inputs == ("video", "audio")
    assert mux.needs == {"video": ("video",), "audio": ("audio",)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server whose --profiles file is the page's examples, one after the other."""
    d = tmp_path_factory.mktemp("profiles-docs")
    profiles = d / "profiles.toml"
    profiles.write_text("\n".join(toml_blocks()))
    proc = serve(d / "data", d / "serve.log", "--profiles", str(profiles))
    yield proc
    proc.stop()


def test_resize_example(
    server: ServerProcess, clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson
) -> None:
    """
    The resize example, through `transcoder submit --param height=144`, gives
    H.264 at 192x144 from the 320x240 clip, its AAC audio copied, 3 s long.
    """
    out = tmp_path / "small.mp4"
    result = _cli(
        server, "submit", str(clips.av), "--profile", "resize", "--param", "height=144",
        "--param", "crf=30", "-q", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    doc = ffprobe_json(out)
    [video] = _streams(doc, "video")
    [audio] = _streams(doc, "audio")
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 192, 144)
    assert audio["codec_name"] == "aac"
    assert abs(float(doc["format"]["duration"]) - 3.0) <= 0.15


def test_mux_example(
    server: ServerProcess, clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson
) -> None:
    """
    The two-input mux example copies the FLV video and the MP3 audio into one
    Matroska file titled as the client asked; a title starting with '-' is
    refused (exit 3, 422 invalid_parameter) before anything runs.
    """
    out = tmp_path / "take.mkv"
    result = _cli(
        server, "submit", str(clips.flv_video), "--audio", str(clips.mp3_audio),
        "--profile", "mux-mkv", "--param", "title=Take 2", "-q", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    doc = ffprobe_json(out)
    assert doc["format"]["format_name"] == "matroska,webm"
    assert doc["format"]["tags"]["title"] == "Take 2"
    assert sorted(s["codec_name"] for s in doc["streams"]) == ["flv1", "mp3"]
    assert int(_streams(doc, "video")[0]["nb_read_frames"]) == 75
    refused = _cli(
        server, "submit", str(clips.flv_video), "--audio", str(clips.mp3_audio),
        "--profile", "mux-mkv", "--param", "title=-y",
    )  # fmt: skip
    assert refused.returncode == EXIT_SERVER_ERROR
    assert "invalid_parameter" in refused.stderr and "must not start with '-'" in refused.stderr


def test_submit_param_height_on_a_builtin(
    server: ServerProcess, clips: Clips, tmp_path: Path, ffprobe_json: FfprobeJson
) -> None:
    """
    `transcoder submit --profile mp4-h264 --param height=720` on the 320x240
    clip gives 320x240 (never scaled up); height=120 gives 160x120.
    """
    for height, size in [("720", (320, 240)), ("120", (160, 120))]:
        out = tmp_path / f"{height}.mp4"
        result = _cli(
            server, "submit", str(clips.av), "--profile", "mp4-h264",
            "--param", f"height={height}", "--param", "crf=35", "-q", "-o", str(out),
        )  # fmt: skip
        assert result.returncode == EXIT_OK, result.stderr
        [video] = _streams(ffprobe_json(out), "video")
        assert (video["width"], video["height"]) == size


BAD = [
    (
        'argv = ["-i", "{file}", "{output}", "-s", "{hieght}"]\n',
        "key 'argv': unknown placeholders {hieght} (known: {file}, {output})",
    ),
    (
        'argv = ["-i", "{file}", "-q", "{q}", "{output}"]\n'
        '[x.parameters.q]\ntype = "int"\ndefault = 4\n',
        "key 'parameters.q.minimum': missing: an int parameter needs a minimum and a maximum",
    ),
    (
        'argv = ["-i", "{file}", "{output}"]\ntimeot = 60\n',
        "key 'timeot': unknown key",
    ),
    (
        'argv = ["-i", "{file}", "{output}"]\ntimeout = "1h"\n',
        "key 'timeout': must be a positive number of seconds",
    ),
    (
        'argv = ["-i", "{file}", "{output}"]\n',
        "key 'executable': 'no-such-encoder' is not an executable on PATH",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_serve_refuses_a_wrong_profiles_file(body: str, message: str, tmp_path: Path) -> None:
    """
    `transcoder serve --profiles bad.toml` exits 2 before listening, its
    message naming the file, the profile and the key; no traceback, and no
    data directory made.
    """
    executable = "no-such-encoder" if "executable" in message else "ffmpeg"
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[x]\nexecutable = "{executable}"\n{body}')
    with pytest.raises(ProfileError):
        load_profiles(bad)
    data = tmp_path / "data"
    result = subprocess.run(
        [
            transcoder(),
            "serve",
            "--listen",
            LISTEN,
            "--data-dir",
            str(data),
            "--profiles",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == EXIT_USAGE
    assert f"transcoder: --profiles: {bad}: profile 'x', {message}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "starting on" not in result.stdout
    assert not data.exists()

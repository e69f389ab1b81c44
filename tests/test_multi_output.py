"""
Profiles with several outputs (issue 17): the hls and thumbnails built-ins run
by execute_job on real encoders, every output checked (playlists parse and
their segments sum to the input's duration, images decode, as many as asked),
and a job that leaves a file its profile does not declare, or too few, fails.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_twisted
from conftest import ffprobe_json, run_ffmpeg
from twisted.internet import reactor

from transcoder.core.jobs import JobState
from transcoder.core.outputs import is_output_name
from transcoder.core.profiles import ParamValue, ProfileError, builtin_profiles, parse_profiles
from transcoder.engine.ladder import pick_rungs
from transcoder.engine.outcome import Outcome
from transcoder.engine.outputs import parse_playlist
from transcoder.engine.runner import execute_job

if TYPE_CHECKING:
    from conftest import Clips

PROFILES = builtin_profiles()


async def _run(
    job_dir: Path,
    profile: str,
    inputs: Mapping[str, Path],
    params: Mapping[str, str] | None = None,
    attempt: int = 0,
) -> Outcome:
    p = PROFILES[profile] if isinstance(profile, str) and profile in PROFILES else profile
    job_dir.mkdir()
    checked: dict[str, ParamValue] = p.validate_params(dict(params or {}))  # type: ignore[union-attr]
    execution = execute_job(
        reactor,
        job_dir=job_dir,
        profile=p,  # type: ignore[arg-type]
        inputs=inputs,
        params=checked,
        timeout=120,
        on_progress=lambda _: None,
        on_spawn=lambda _: None,
        attempt=attempt,
    )
    return await execution.deferred


@pytest.fixture(scope="module")
def tall_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5 s 640x480 clip with audio."""
    path = tmp_path_factory.mktemp("tall") / "tall.mp4"
    run_ffmpeg(
        *("-f", "lavfi", "-i", "testsrc=size=640x480:rate=25:duration=5"),
        *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=5"),
        *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"),
        *("-c:a", "aac", "-b:a", "64k", "-shortest", str(path)),
    )
    return path


def test_pick_rungs_leaves_out_rungs_taller_than_the_source() -> None:
    """Rungs above the source's height are left out; if all are, one rung at the source's (even) height."""
    assert [r.name for r in pick_rungs("1080p,360p,720p", 720)] == ["360p", "720p"]
    assert [r.name for r in pick_rungs("360p,720p", 1080)] == ["360p", "720p"]
    only = pick_rungs("720p,1080p", 241)
    assert [(r.name, r.height) for r in only] == [("240p", 240)]


def test_output_names_refuse_traversal() -> None:
    """An output's name is relative, at most four levels, and never holds '..' or starts with '.'."""
    for ok in ("master.m3u8", "360p/index.m3u8", "thumb-001.jpg"):
        assert is_output_name(ok)
    for bad in ("../x", "/etc/passwd", "a/../../b", ".hidden", "a//b", "", "a/b/c/d/e"):
        assert not is_output_name(bad), bad


@pytest_twisted.ensureDeferred
async def test_hls_ladder_plays_and_sums_to_the_input(tall_clip: Path, tmp_path: Path) -> None:
    """hls with rungs 240p,360p,1080p on a 480-line source: two renditions (1080p left out), a master naming both, each playlist's segments summing to the input's 5 s, every segment H.264/AAC; ffprobe reads the master."""
    outcome = await _run(
        tmp_path / "job",
        "hls",
        {"file": tall_clip},
        {"rungs": "240p,360p,1080p", "segment_seconds": "2"},
    )
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert outcome.output is None
    names = {o.name for o in outcome.outputs}
    assert {"master.m3u8", "240p/index.m3u8", "360p/index.m3u8"} <= names
    assert not any(n.startswith("1080p") for n in names)
    out = tmp_path / "job" / "outputs"
    assert not (tmp_path / "job" / "outputs.partial").exists()
    master = parse_playlist((out / "master.m3u8").read_text())
    assert not isinstance(master, str)
    assert master[0] == ["240p/index.m3u8", "360p/index.m3u8"]
    for rung, height in (("240p", 240), ("360p", 360)):
        playlist = parse_playlist((out / rung / "index.m3u8").read_text())
        assert not isinstance(playlist, str)
        assert abs(sum(s for s, _ in playlist[1]) - 5.0) < 0.25
        seg = ffprobe_json(out / rung / playlist[1][0][1])
        codecs = {s["codec_type"]: s for s in seg["streams"]}
        assert codecs["video"]["codec_name"] == "h264" and codecs["video"]["height"] == height
        assert codecs["audio"]["codec_name"] == "aac"
    doc = ffprobe_json(out / "master.m3u8")
    assert abs(float(doc["format"]["duration"]) - 5.0) < 0.3
    for o in outcome.outputs:
        assert o.path == f"outputs/{o.name}"
        assert (tmp_path / "job" / o.path).stat().st_size == o.size
    assert outcome.inputs_media is not None
    file = outcome.inputs_media["file"]
    assert file["streams"][0]["height"] == 480 and file["streams"][1]["sample_rate"] == 44100


@pytest_twisted.ensureDeferred
async def test_thumbnails_n_stills_and_a_poster(tall_clip: Path, tmp_path: Path) -> None:
    """thumbnails count=4 height=120: thumb-001..004.jpg and poster.jpg, each a JPEG ffprobe decodes at 160x120."""
    outcome = await _run(
        tmp_path / "job", "thumbnails", {"file": tall_clip}, {"count": "4", "height": "120"}
    )
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    names = sorted(o.name for o in outcome.outputs)
    assert names == ["poster.jpg", *(f"thumb-00{i}.jpg" for i in range(1, 5))]
    for o in outcome.outputs:
        assert o.media_type == "image/jpeg"
        doc = ffprobe_json(tmp_path / "job" / o.path)
        (video,) = doc["streams"]
        assert video["codec_name"] == "mjpeg" and (video["width"], video["height"]) == (160, 120)
        assert int(video["nb_read_frames"]) == 1


@pytest_twisted.ensureDeferred
async def test_attempts_write_their_own_directory(clips: Clips, tmp_path: Path) -> None:
    """With several nodes, attempt 2 writes outputs.partial.2/ and keeps outputs.2/: another attempt's names are never touched."""
    other = tmp_path / "job" / "outputs.1"
    outcome = await _run(
        tmp_path / "job", "thumbnails", {"file": clips.av}, {"count": "2"}, attempt=2
    )
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert {o.path for o in outcome.outputs} == {
        "outputs.2/poster.jpg",
        "outputs.2/thumb-001.jpg",
        "outputs.2/thumb-002.jpg",
    }
    assert not other.exists()


def _profile(argv_tail: str, outputs: str) -> str:
    return f"""
[p]
executable = "sh"
argv = ["-c", "{argv_tail}", "sh", "{{file}}", "{{output_dir}}"]
outputs = [{outputs}]
"""


@pytest.mark.parametrize(
    ("script", "outputs", "error"),
    [
        (
            'cp \\"$1\\" \\"$2/a.mp4\\"; echo x > \\"$2/extra.txt\\"',
            '{name = "a.mp4"}',
            "'extra.txt', which its profile does not declare",
        ),
        (
            'cp \\"$1\\" \\"$2/a-1.mp4\\"',
            '{name = "a-*.mp4", count = 2}',
            "output a-*.mp4: 1 files, not 2",
        ),
        ('head -c 1000 \\"$1\\" > \\"$2/a.mp4\\"', '{name = "a.mp4"}', "output a.mp4"),
        (
            'printf \\"#EXTM3U\\\\n#EXTINF:1.0,\\\\ns.ts\\\\n#EXT-X-ENDLIST\\\\n\\" > \\"$2/m.m3u8\\"; touch \\"$2/s.ts\\"',
            '{name = "m.m3u8", check = "hls"}, {name = "*.ts", check = "none"}',
            "segments last 1.00 s, the input lasts 3.0",
        ),
        (
            'echo nope > \\"$2/t.jpg\\"',
            '{name = "t.jpg", check = "image"}',
            "output t.jpg is not an image",
        ),
        (
            'ffmpeg -v error -i \\"$1\\" -frames:v 1 \\"$2/t-1.jpg\\" && cp \\"$2/t-1.jpg\\"'
            ' \\"$2/t-3.jpg\\" && head -c 3000 /dev/urandom > \\"$2/t-2.jpg\\"',
            '{name = "t-*.jpg", check = "image"}',
            "output t-2.jpg is not an image",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_job_fails_unless_every_output_passes(
    script: str, outputs: str, error: str, clips: Clips, tmp_path: Path
) -> None:
    """Each case fails the job, saying why, and leaves no output directory: an undeclared file, too few files for a count, a truncated video, a playlist shorter than the input, an image that does not decode, and, among images that do, the one that does not is named."""
    profile = parse_profiles(_profile(script, outputs))["p"]
    outcome = await _run(tmp_path / "job", profile, {"file": clips.av})  # type: ignore[arg-type]
    assert outcome.state is JobState.FAILED
    assert error in (outcome.error or ""), outcome.error
    assert sorted(os.listdir(tmp_path / "job")) == ["encoder.log"]


def test_profile_outputs_refused_when_wrong() -> None:
    """A profile with outputs must write {output_dir}, not also declare output_extension, and count only names an int parameter."""
    base = '[p]\nexecutable = "ffmpeg"\n'
    with pytest.raises(ProfileError, match=r"unknown placeholders \{output\}"):
        parse_profiles(base + 'argv = ["{file}", "{output}"]\noutputs = [{name = "a.mp4"}]\n')
    with pytest.raises(ProfileError, match="output_extension"):
        parse_profiles(
            base
            + 'argv = ["{file}", "{output_dir}"]\noutput_extension = "mp4"\noutputs = [{name = "a.mp4"}]\n'
        )
    with pytest.raises(ProfileError, match="names no int parameter"):
        parse_profiles(
            base
            + 'argv = ["{file}", "{output_dir}"]\noutputs = [{name = "a-*.jpg", count = "{n}"}]\n'
        )
    with pytest.raises(ProfileError, match="name"):
        parse_profiles(
            base + 'argv = ["{file}", "{output_dir}"]\noutputs = [{name = "../a.mp4"}]\n'
        )

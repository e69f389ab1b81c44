"""Profiles: server-side recipes whose only client-set values are checked parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage

from transcoder.core.errors import Invalid
from transcoder.core.profiles import ProfileError, builtin_profiles, load_profiles, parse_profiles
from transcoder.http.errors import http_error
from transcoder.service import Options

BUILTINS = {
    "mux-avi",
    "avi-mpeg4",
    "mp4-h264",
    "webm-vp9",
    "audio-mp3",
    "audio-aac",
    "hls",
    "thumbnails",
}


def test_builtins_are_the_documented_profiles() -> None:
    """The eight built-ins ship, with the inputs, outputs and needs the docs give."""
    profiles = builtin_profiles()
    assert set(profiles) == BUILTINS
    assert profiles["mux-avi"].inputs == ("video", "audio")
    assert profiles["avi-mpeg4"].inputs == ("file",)
    assert (profiles["mp4-h264"].output_extension, profiles["mp4-h264"].media_type) == (
        "mp4",
        "video/mp4",
    )
    assert {"-noskip", "-mc"} <= set(profiles["avi-mpeg4"].argv)
    one_output = {n for n in BUILTINS if not profiles[n].outputs}
    assert {n: [o.name for o in profiles[n].outputs] for n in BUILTINS - one_output} == {
        "hls": ["master.m3u8", "*/index.m3u8", "*/seg-*.ts"],
        "thumbnails": ["thumb-*.jpg", "poster.jpg"],
    }
    assert {n: (profiles[n].output_extension, profiles[n].media_type) for n in one_output} == {
        "mux-avi": ("avi", "video/x-msvideo"),
        "avi-mpeg4": ("avi", "video/x-msvideo"),
        "mp4-h264": ("mp4", "video/mp4"),
        "webm-vp9": ("webm", "video/webm"),
        "audio-mp3": ("mp3", "audio/mpeg"),
        "audio-aac": ("m4a", "audio/mp4"),
    }
    assert profiles["audio-mp3"].needs == {"file": ("audio",)}
    assert profiles["audio-aac"].needs == {"file": ("audio",)}
    assert profiles["webm-vp9"].needs == {"file": ("video",)}
    for name in ("mp4-h264", "webm-vp9"):
        height = profiles[name].parameters["height"]
        assert (height.minimum, height.maximum, height.default) == (16, 4320, 4320)


def test_mp4_h264_is_as_it_was_but_for_the_height_limit() -> None:
    """mp4-h264's argv is the one before the height parameter, its scale filter aside."""
    p = builtin_profiles()["mp4-h264"]
    argv = p.build_argv({"file": "in"}, "out", p.validate_params({"height": "720"}))
    vf = argv[argv.index("-vf") + 1]
    assert vf == "scale=w='trunc(iw*oh/ih/2)*2':h='trunc(min(ih,720)/2)*2'"
    assert argv[: argv.index("-vf")] == [
        "ffmpeg", "-nostdin", "-y", "-nostats", "-progress", "pipe:1", "-i", "in",
    ]  # fmt: skip
    assert argv[argv.index("-vf") + 2 :] == [
        "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart",
        "-f", "mp4", "out",
    ]  # fmt: skip


def test_parameters_get_defaults_and_are_range_checked() -> None:
    """Missing parameters take their defaults; values outside the range or of the wrong kind are 422."""
    p = builtin_profiles()["avi-mpeg4"]
    assert p.validate_params({}) == {"vbitrate": 2000, "abitrate": 128}
    assert p.validate_params({"vbitrate": "100"})["vbitrate"] == 100
    for bad in [
        "99",
        "20001",
        "abc",
        "",
        "1e3",
        " 1000",
        "1_000",
        "\u0661\u0660\u0660\u0660",  # Arabic-Indic digits
        "-o /etc/passwd",
        "1000;rm",
    ]:
        with pytest.raises(Invalid) as e:
            p.validate_params({"vbitrate": bad})
        assert (http_error(e.value).status, e.value.code) == (422, "invalid_parameter")


def test_unknown_parameters_and_choices_are_refused() -> None:
    """A parameter the profile does not declare, or a choice it does not list, is 422."""
    p = builtin_profiles()["mp4-h264"]
    with pytest.raises(Invalid) as e:
        p.validate_params({"vf": "scale=1:1"})
    assert e.value.code == "unknown_parameter"
    with pytest.raises(Invalid) as e:
        p.validate_params({"preset": "--output=/etc/passwd"})
    assert e.value.code == "invalid_parameter"
    assert p.validate_params({"preset": "slow"})["preset"] == "slow"


@given(st.text(max_size=40))
def test_argv_holds_only_checked_values(raw: str) -> None:
    """Whatever a client sends as a parameter, argv gets either a checked integer or nothing (422)."""
    p = builtin_profiles()["avi-mpeg4"]
    try:
        params = p.validate_params({"vbitrate": raw})
    except Invalid:
        return
    argv = p.build_argv({"file": "/data/in"}, "/data/out.avi", params)
    assert f"vbitrate={int(raw)}" in " ".join(argv)
    assert argv[0] == "mencoder" and argv[-1] == "/data/out.avi"


def test_build_argv_fills_inputs_output_and_parameters() -> None:
    """Placeholders are replaced inside arguments too; argv is a list, never a shell string."""
    p = builtin_profiles()["mux-avi"]
    argv = p.build_argv({"video": "/j/v.flv", "audio": "/j/a.mp3"}, "/j/out.avi", {})
    assert argv == [
        "mencoder", "/j/v.flv", "-audiofile", "/j/a.mp3", "-ovc", "copy", "-oac", "copy",
        "-o", "/j/out.avi",
    ]  # fmt: skip


def test_profiles_file_extends_or_replaces_the_builtins(tmp_path: Path) -> None:
    """--profiles adds (or overrides by name) profiles; replace_builtins = true keeps only the file's."""
    extra = tmp_path / "p.toml"
    extra.write_text(
        '[copy]\nexecutable = "ffmpeg"\nargv = ["-i", "{file}", "-c", "copy", "{output}"]\n'
        'output_extension = "mkv"\n'
    )
    assert set(load_profiles(extra)) == BUILTINS | {"copy"}
    extra.write_text("replace_builtins = true\n" + extra.read_text())
    assert set(load_profiles(extra)) == {"copy"}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[x]\nexecutable = "a"\nargv = ["{file}"]\n', "never names {output}"),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{nope}"]\n',
            "unknown placeholders",
        ),
        ('[x]\nexecutable = "a"\nargv = "{file} {output}"\n', "argv must be a list"),
        ('[x]\nexecutable = "a"\nargv = ["{output}"]\n', "never used"),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "choice"\nchoices = ["-rf"]\ndefault = "-rf"\n',
            "plain words",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "int"\nminimum = 1\nmaximum = 5\ndefault = 9\n',
            "default 9 is invalid",
        ),
        ("[x\n", "not valid TOML"),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}"]\ntimeot = 5\n',
            "profile 'x', key 'timeot': unknown key",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{Height}"]\n',
            "profile 'x', key 'argv': unknown placeholders {Height} (known: {file}, {output})",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "int"\nmaximum = 5\ndefault = 1\n',
            "profile 'x', key 'parameters.p.minimum': missing: an int parameter needs a minimum",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "float"\nminimum = 0\ndefault = 1.0\n',
            "profile 'x', key 'parameters.p.maximum': missing",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "integer"\ndefault = 1\n',
            "profile 'x', key 'parameters.p.type': must be one of int, float, choice, bool, string",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "int"\nminimum = 0\nmaximum = 9\ndefault = "5"\n',
            "profile 'x', key 'parameters.p.default': '5' is not a int",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "int"\nminimum = 0\nmaximum = 9\ndefault = 1\n'
            'choices = ["a"]\n',
            "profile 'x', key 'parameters.p.choices': unknown key for a int parameter",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "string"\ndefault = "a"\n',
            "profile 'x', key 'parameters.p.pattern': missing",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}", "{p}"]\n'
            '[x.parameters.p]\ntype = "string"\npattern = "[a-z"\ndefault = "a"\n',
            "profile 'x', key 'parameters.p.pattern': not a regular expression",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}"]\ntimeout = "1h"\n',
            "profile 'x', key 'timeout': must be a positive number",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}"]\nneeds = { file = ["subtitle"] }\n',
            "profile 'x', key 'needs'",
        ),
        (
            '[x]\nexecutable = "a"\nargv = ["{file}", "{output}"]\nmedia_type = "mp4"\n',
            "profile 'x', key 'media_type'",
        ),
    ],
)
def test_bad_profiles_files_are_refused_with_the_reason(text: str, why: str) -> None:
    """A malformed profile is refused at start-up, saying what is wrong."""
    with pytest.raises(ProfileError, match=re.escape(why)):
        parse_profiles(text)


def test_a_bad_file_is_named_with_the_profile_and_the_key(tmp_path: Path) -> None:
    """load_profiles puts the file's path before the profile and the key at fault."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[x]\nexecutable = "ffmpeg"\nargv = ["{file}", "{output}", "{nope}"]\n')
    with pytest.raises(ProfileError) as e:
        load_profiles(bad)
    assert str(e.value).startswith(f"{bad}: profile 'x', key 'argv': unknown placeholders {{nope}}")


def test_an_executable_missing_from_path_is_refused_at_load(tmp_path: Path) -> None:
    """A file's profile whose executable is not on PATH is refused when loaded, not at its first job."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[x]\nexecutable = "no-such-encoder"\nargv = ["{file}", "{output}"]\n')
    with pytest.raises(ProfileError) as e:
        load_profiles(bad)
    message = str(e.value)
    assert message.startswith(f"{bad}: profile 'x', key 'executable': 'no-such-encoder' is not")
    bad.write_text('[x]\nexecutable = "/bin/sh"\nargv = ["{file}", "{output}"]\n')
    assert load_profiles(bad)["x"].executable == "/bin/sh"


_TYPES = """
[t]
executable = "ffmpeg"
argv = ["-i", "{file}", "{flag}", "{title}", "{output}"]

[t.parameters.flag]
type = "bool"
default = false

[t.parameters.title]
type = "string"
pattern = "[A-Za-z0-9 ]{1,40}"
default = "untitled"
description = "Shown in the output's metadata."
"""


def test_bool_parameters_take_true_or_false_and_reach_argv_as_1_or_0() -> None:
    """A bool is true/false (or 1/0) from a client, 1 or 0 in argv; anything else is 422."""
    p = parse_profiles(_TYPES)["t"]
    assert p.validate_params({})["flag"] is False
    for raw, value in [("true", True), ("1", True), ("false", False), ("0", False)]:
        assert p.validate_params({"flag": raw})["flag"] is value
    argv = p.build_argv({"file": "in"}, "out", p.validate_params({"flag": "true"}))
    assert argv == ["ffmpeg", "-i", "in", "1", "untitled", "out"]
    for bad in ["yes", "True", "", "2", "on"]:
        with pytest.raises(Invalid, match="must be true or false"):
            p.validate_params({"flag": bad})
    assert p.parameters["flag"].to_json() == {"type": "bool", "default": False}


def test_string_parameters_match_their_whole_pattern_and_never_start_with_a_dash() -> None:
    """
    A string reaches argv only when the whole of it matches the profile's
    pattern (ASCII classes), it does not start with '-' whatever the pattern
    allows, and it is at most 256 characters.
    """
    p = parse_profiles(_TYPES.replace("[A-Za-z0-9 ]{1,40}", "[-\\\\w ]{1,300}"))["t"]
    assert p.validate_params({"title": "My clip 2"})["title"] == "My clip 2"
    for bad, why in [
        ("-o", "must not start with '-'"),
        ("-", "must not start with '-'"),
        ("a" * 257, "longer than 256"),
        ("a\n", "must match"),
        ("caf\u00e9", "must match"),
        ("\u0661", "must match"),
        ("a/b", "must match"),
    ]:
        with pytest.raises(Invalid, match=why) as e:
            p.validate_params({"title": bad})
        assert e.value.code == "invalid_parameter"
    assert p.parameters["title"].to_json()["pattern"] == "[-\\w ]{1,300}"


def test_a_string_default_must_pass_its_own_checks() -> None:
    """A string default that does not match, or starts with '-', is refused at load."""
    for default, pattern, why in [
        ("", "[A-Za-z0-9 ]{1,40}", "must match"),
        ("-rf", "[-A-Za-z0-9 ]{1,40}", "must not start with '-'"),
    ]:
        text = _TYPES.replace('default = "untitled"', f'default = "{default}"')
        with pytest.raises(ProfileError, match=f"parameters.title.default.*{why}"):
            parse_profiles(text.replace("[A-Za-z0-9 ]{1,40}", pattern))


@given(st.text(max_size=60))
def test_string_values_in_argv_always_match_and_never_look_like_options(raw: str) -> None:
    """Whatever a client sends as a string, argv gets it only whole-matched and not starting with '-'."""
    p = parse_profiles(_TYPES.replace("[A-Za-z0-9 ]{1,40}", "[-=:,A-Za-z0-9 ]*"))["t"]
    try:
        value = p.validate_params({"title": raw})["title"]
    except Invalid:
        return
    assert isinstance(value, str) and value == raw
    assert not value.startswith("-") and len(value) <= 256
    assert all(c.isascii() and (c.isalnum() or c in "-=:, ") for c in value)


def test_options_turn_a_bad_profiles_file_into_a_usage_error(tmp_path: Path) -> None:
    """transcoder serve --profiles with a broken or missing file exits with a usage error, not a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[x]\nexecutable = "a"\nargv = ["{file}"]\n')
    for path in (bad, tmp_path / "missing.toml"):
        with pytest.raises(usage.UsageError, match="--profiles"):
            Options().parseOptions(["--profiles", str(path)])

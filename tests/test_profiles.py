"""Profiles: server-side recipes whose only client-set values are checked parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage

from transcoder.core.errors import Invalid
from transcoder.core.profiles import ProfileError, builtin_profiles, load_profiles, parse_profiles
from transcoder.http.errors import http_error
from transcoder.service import Options


def test_builtins_are_the_three_documented_profiles() -> None:
    """mux-avi, avi-mpeg4 and mp4-h264 ship built in, with the inputs and outputs the docs give."""
    profiles = builtin_profiles()
    assert set(profiles) == {"mux-avi", "avi-mpeg4", "mp4-h264"}
    assert profiles["mux-avi"].inputs == ("video", "audio")
    assert profiles["avi-mpeg4"].inputs == ("file",)
    assert (profiles["mp4-h264"].output_extension, profiles["mp4-h264"].media_type) == (
        "mp4",
        "video/mp4",
    )
    assert {"-noskip", "-mc"} <= set(profiles["avi-mpeg4"].argv)


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
    assert set(load_profiles(extra)) == {"mux-avi", "avi-mpeg4", "mp4-h264", "copy"}
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
    ],
)
def test_bad_profiles_files_are_refused_with_the_reason(text: str, why: str) -> None:
    """A malformed profile is refused at start-up, saying what is wrong."""
    with pytest.raises(ProfileError, match=why.replace("{", r"\{").replace("}", r"\}")):
        parse_profiles(text)


def test_options_turn_a_bad_profiles_file_into_a_usage_error(tmp_path: Path) -> None:
    """transcoder serve --profiles with a broken or missing file exits with a usage error, not a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[x]\nexecutable = "a"\nargv = ["{file}"]\n')
    for path in (bad, tmp_path / "missing.toml"):
        with pytest.raises(usage.UsageError, match="--profiles"):
            Options().parseOptions(["--profiles", str(path)])

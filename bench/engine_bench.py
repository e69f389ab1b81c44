#!/usr/bin/env python3
"""
What the job engine adds to an encoder's own time (issue 4, "Speed").

For each built-in profile, on a generated clip (default 60 s at 640x360):

  direct  the profile's command line as the runner builds it (the same argv,
          through setsid, in a working directory, with the runner's
          environment), run with subprocess and timed from start to exit.
          A profile with several outputs (hls, thumbnails) writes into an
          empty directory, and its argv's probed placeholders (the input's
          duration and height, the HLS ladder) are filled by the engine's
          own functions from one ffprobe of the input made before the
          rounds: the command a user would type having looked at the file.
          The run must leave an output (a non-empty file or directory);
  server  the same job through a running `transcoder serve`: the time from
          the upload's completion to the job's end with `succeeded`, both as
          the server recorded them on this machine's clock: the job's
          `created_at` (the body is on disk and the job is being created)
          and its `finished_at`.  (Timing from the 201 instead would leave
          out the 10-30 ms the job has already run when the client sees
          the 201: the server stores and starts a job before it answers.)
          So how the bench follows the job adds nothing to the time.  The
          bench follows it with `GET /jobs/<id>?wait=60` long-polls, with a
          pause (--poll-pause, 0.2 s) after each answer: a long-poll answers
          at each whole percent of progress, and without the pause a
          mencoder job drew many requests whose CPU competed with the
          encoder.  The time includes what the service does around the
          encoder: storing the job, probing the inputs (beside the encoder),
          checking the output's duration (from its header, in-process) and
          hashing it.

Direct and server runs alternate within every round, so a change in the
machine's load hits both alike.  Round 0 is a warm-up and is not counted.
It prints, per profile, the medians (min-max), the ratio server/direct
(target: at most 1.05) and the difference, as a Markdown table.  The last
two columns are what the ffprobe runs the service makes of a job's inputs (one
per input) take when run one after another alone (not in it: those that check
an output the in-process header reader does not know, such as an MP3 or WebM,
or thumbnails' images, one each), and the CPU time the server process itself
used during the job (reading the encoder's output, progress, log, hashing),
which competes with the encoder for the cores.

usage: engine_bench.py [--seconds 60] [--size 640x360] [--rounds 3]
                       [--profiles mp4-h264,avi-mpeg4,...] [--poll-pause 0.2]
(--profiles: every built-in by default)
needs: ffmpeg, mencoder, curl on PATH; run with the project's virtualenv
(.venv/bin/python), whose `transcoder` it starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from _project_server import ProjectServer

from transcoder.core.profiles import ParamValue, Profile, builtin_profiles
from transcoder.engine.ladder import probed_values
from transcoder.engine.outputs import partial_path
from transcoder.engine.probe import MediaInfo, parse_ffprobe, tool_env

# Every built-in profile, the issue 4 ones first.
ALL_PROFILES = "mp4-h264,avi-mpeg4,mux-avi,webm-vp9,audio-mp3,audio-aac,hls,thumbnails"
# The probe the runner makes of each input (transcoder.engine.probe.probe).
FFPROBE = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json"]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_inputs(work: Path, seconds: int, size: str) -> dict[str, Path]:
    """The clip every single-input profile gets, and the FLV + MP3 pair for mux-avi."""
    video = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration={seconds}"]
    audio = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    clip, flv, mp3 = work / "clip.mp4", work / "video.flv", work / "audio.mp3"
    ffmpeg(
        *video,
        *audio,
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-shortest",
        str(clip),
    )
    ffmpeg(*video, "-c:v", "flv1", "-b:v", "1500k", "-an", str(flv))
    ffmpeg(*audio, "-c:a", "libmp3lame", "-b:a", "128k", str(mp3))
    return {"file": clip, "video": flv, "audio": mp3}


def inputs_for(profile: Profile, files: dict[str, Path]) -> dict[str, Path]:
    return {role: files[role] for role in profile.inputs}


def probe_inputs(files: dict[str, Path]) -> dict[str, MediaInfo]:
    """Each input as the runner's probe sees it (run once, before the rounds)."""
    return {
        role: parse_ffprobe(
            subprocess.run(
                [*FFPROBE, f"file:{path.absolute()}"], capture_output=True, check=True
            ).stdout
        )
        for role, path in files.items()
    }


def direct_argv(
    profile: Profile, inputs: dict[str, str], output: str, infos: dict[str, MediaInfo]
) -> list[str]:
    """
    The argv the runner builds for a job with the default parameters: the
    probed placeholders (hls, thumbnails) filled as the runner fills them.
    """
    params: dict[str, ParamValue] = profile.validate_params({})
    probed = probed_values(profile, params, [infos[role] for role in profile.inputs])
    return profile.build_argv(inputs, output, params, probed)


def run_direct(
    profile: Profile, inputs: dict[str, Path], infos: dict[str, MediaInfo], work: Path
) -> float:
    """Seconds the profile's own command line takes, set up as the runner sets it up."""
    job_dir = work / "direct"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir()
    output = partial_path(job_dir, profile, 0)
    if profile.multi_output:
        output.mkdir()
    argv = direct_argv(profile, {r: str(p) for r, p in inputs.items()}, str(output), infos)
    t = time.perf_counter()
    subprocess.run(
        ["setsid", *argv],
        env=tool_env(home=job_dir),
        cwd=job_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    took = time.perf_counter() - t
    wrote = any(output.iterdir()) if profile.multi_output else output.stat().st_size > 0
    if not wrote:
        raise SystemExit(f"{profile.name}: the direct run wrote nothing")
    return took


def probe_time(paths: list[Path]) -> float:
    """Seconds that ffprobe runs on C{paths} take, one after another."""
    t = time.perf_counter()
    for path in paths:
        subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-show_format",
                "-show_streams",
                "-of",
                "json",
                f"file:{path}",
            ],
            stdout=subprocess.DEVNULL,
            check=True,
        )
    return time.perf_counter() - t


def direct_command(profile: Profile, inputs: dict[str, Path], infos: dict[str, MediaInfo]) -> str:
    output = partial_path(Path("."), profile, 0)
    return " ".join(
        direct_argv(profile, {r: p.name for r, p in inputs.items()}, str(output), infos)
    )


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as answer:
        return json.load(answer)


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


def run_server(
    server: ProjectServer, profile: Profile, inputs: dict[str, Path], work: Path, pause: float
) -> tuple[float, float, int, str]:
    """
    Seconds from the upload's completion to the job's end as the server
    recorded them (its C{created_at} and C{finished_at}, on this same clock),
    the server's CPU seconds from the 201 on, how many status requests the
    wait took, and where the time before the 201 went.
    """
    answer = work / "answer.json"
    if len(inputs) == 1:
        (path,) = inputs.values()
        body = ["-T", str(path)]
    else:
        body = [a for role, path in inputs.items() for a in ("-F", f"{role}=@{path}")]
    code = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            str(answer),
            "-w",
            "%{http_code}",
            *body,
            f"{server.url}/jobs?profile={profile.name}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    t = time.time()
    c = server.cpu()
    if code != "201":
        raise SystemExit(f"{profile.name}: upload answered {code}: {answer.read_text()}")
    job = json.loads(answer.read_text())
    polls = 0
    while job["state"] in ("queued", "running"):
        if polls and pause:
            time.sleep(pause)
        job = get_json(f"{server.url}/jobs/{job['id']}?wait=60")
        polls += 1
    used = server.cpu() - c
    if job["state"] != "succeeded":
        raise SystemExit(f"{profile.name}: job {job['state']}: {job.get('error')}")
    created, started = epoch(job["created_at"]), epoch(job["started_at"])
    took = epoch(job["finished_at"]) - created
    head = (
        f"created->started {(started - created) * 1000:.0f} ms, "
        f"started->201 seen {(t - started) * 1000:.0f} ms"
    )
    # Keep the data dir small: delete the job outside the timed window.
    req = urllib.request.Request(f"{server.url}/jobs/{job['id']}", method="DELETE")
    urllib.request.urlopen(req, timeout=60).close()
    return took, used, polls, head


def fmt(values: list[float]) -> str:
    # Milliseconds show: a stream copy takes 0.1 s, and its budget is 5 ms.
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profiles", default=ALL_PROFILES)
    ap.add_argument(
        "--poll-pause",
        type=float,
        default=0.2,
        help="seconds between a long-poll's answer and the next (0: none)",
    )
    args = ap.parse_args()

    profiles = builtin_profiles()
    names = args.profiles.split(",")
    work = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    server = None
    try:
        files = make_inputs(work, args.seconds, args.size)
        infos = probe_inputs(files)
        server = ProjectServer(work, "--workers", "1")
        times: dict[str, dict[str, list[float]]] = {
            n: {"direct": [], "server": [], "probe": [], "cpu": []} for n in names
        }
        for rnd in range(args.rounds + 1):
            for name in names:
                profile = profiles[name]
                inputs = inputs_for(profile, files)
                d = run_direct(profile, inputs, infos, work)
                p = probe_time(list(inputs.values()))
                s, c, polls, head = run_server(server, profile, inputs, work, args.poll_pause)
                if rnd:
                    times[name]["cpu"].append(c)
                    times[name]["direct"].append(d)
                    times[name]["server"].append(s)
                    times[name]["probe"].append(p)
                print(
                    f"round {rnd}{' (warm-up)' if not rnd else ''} {name}: "
                    f"direct {d:.3f} s, server {s:.3f} s, probes {p:.3f} s, "
                    f"server cpu {c:.2f} s, {polls} polls, "
                    f"{head}",
                    file=sys.stderr,
                )

        print(
            f"\nengine: {args.seconds} s {args.size} clip, {args.rounds} rounds (+1 warm-up); "
            f"seconds, median (min-max)\n"
        )
        print(
            "| profile | direct s | server s (upload complete -> succeeded) | ratio | overhead s "
            "| ffprobe s | server cpu s |"
        )
        print("|---|---|---|---|---|---|---|")
        for name in names:
            d, s = times[name]["direct"], times[name]["server"]
            ratio = statistics.median(s) / statistics.median(d)
            print(
                f"| {name} | {fmt(d)} | {fmt(s)} | {ratio:.3f} | "
                f"{statistics.median(s) - statistics.median(d):+.3f} | "
                f"{statistics.median(times[name]['probe']):.3f} | "
                f"{statistics.median(times[name]['cpu']):.2f} |"
            )
        print("\nserver: " + " ".join(server.argv).replace(str(work), "$WORK"))
        print("direct commands (run in $WORK/direct through setsid, env PATH, LANG=C.UTF-8, HOME):")
        for name in names:
            profile = profiles[name]
            print(f"  {name}: {direct_command(profile, inputs_for(profile, files), infos)}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""
The command's progress display on its own, with a clock the test moves:
bars (as on a terminal) and plain lines (logs), sizes in binary units, a
time left once progress allows, and a finished job's bar saying how it ended.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from transcoder.client.cli_progress import Progress, duration, size, time_left


@dataclass
class _Job:
    id: str
    state: str
    progress: float


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _screens(text: str) -> list[str]:
    """What a terminal showed, each redraw (tqdm's \\r) as one screen."""
    return [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]


def test_the_job_bar_ends_saying_succeeded_at_100() -> None:
    """
    On a terminal the transcode bar shows a time left once there is progress
    to go on, and when the job succeeds it says "succeeded" at 100% (not the
    last progress seen, not "running").
    """
    err, clock = io.StringIO(), _Clock()
    progress = Progress(err, quiet=False, tty=True, clock=clock)
    progress.job(_Job("j", "queued", 0))
    progress.job(_Job("j", "running", 0))
    clock.now += 10
    progress.job(_Job("j", "running", 25))
    clock.now += 10
    progress.job(_Job("j", "running", 93))
    progress.job(_Job("j", "succeeded", 93))
    screens = _screens(err.getvalue())
    assert any(s.startswith("running:  25%") and s.endswith("00:30 left") for s in screens)
    assert screens[-1].startswith("succeeded: 100%|")
    assert "left" not in screens[-1]


def test_no_time_left_before_progress_allows() -> None:
    """At 0% (or with under a second gone) no time left is shown: it would be a guess."""
    assert time_left(0, 100, 30) is None
    assert time_left(50, 100, 0.5) is None
    assert time_left(0.5, 100, 30) is None
    assert time_left(25, 100, 10) == 30
    assert time_left(100, 100, 10) is None
    err, clock = io.StringIO(), _Clock()
    progress = Progress(err, quiet=False, tty=True, clock=clock)
    progress.job(_Job("j", "running", 0))
    clock.now += 5
    progress.job(_Job("j", "running", 0))
    assert "left" not in err.getvalue()


def test_a_failed_job_keeps_its_progress() -> None:
    """A job that fails at 40% ends its bar saying "failed" at 40%."""
    err = io.StringIO()
    progress = Progress(err, quiet=False, tty=True, clock=_Clock())
    progress.job(_Job("j", "running", 40))
    progress.job(_Job("j", "failed", 40))
    assert _screens(err.getvalue())[-1].startswith("failed:  40%|")


def test_byte_bars_use_binary_units_and_show_time_left() -> None:
    """
    Upload and download bars count in KiB/MiB (as the plain lines do), with
    the rate in MiB/s and, once a second has gone, the time left.
    """
    err, clock = io.StringIO(), _Clock()
    progress = Progress(err, quiet=False, tty=True, clock=clock)
    report = progress.bytes("upload")
    total = 200 << 20
    clock.now += 2
    report(50 << 20, total)
    screen = _screens(err.getvalue())[-1]
    assert screen.startswith("upload:  25%|")
    assert screen.endswith("50.0 MiB of 200.0 MiB, 25.0 MiB/s, 00:06 left")
    assert not re.search(r"\d(MB|kB|KB|GB)", err.getvalue())


def test_plain_lines() -> None:
    """
    Without a terminal: a line per tenth and per state, the time left on a
    running job's lines once known, and "succeeded 100%" at the end.
    """
    err, clock = io.StringIO(), _Clock()
    progress = Progress(err, quiet=False, tty=False, clock=clock)
    progress.job(_Job("j", "running", 0))
    clock.now += 10
    progress.job(_Job("j", "running", 50))
    progress.job(_Job("j", "running", 52))
    progress.job(_Job("j", "succeeded", 99))
    assert err.getvalue().splitlines() == [
        "job j: running 0%",
        "job j: running 50%, 00:10 left",
        "job j: succeeded 100%",
    ]
    report = progress.bytes("download")
    report(1 << 20, 2 << 20)
    assert err.getvalue().splitlines()[-1] == "download: 50% (1.0 MiB of 2.0 MiB)"


def test_units() -> None:
    """Sizes in binary units with one decimal; times as tqdm shows the time elapsed."""
    assert [size(n) for n in (512, 1536, 5 << 20, 3 << 30)] == [
        "512 B", "1.5 KiB", "5.0 MiB", "3.0 GiB",
    ]  # fmt: skip
    assert (duration(75), duration(3725)) == ("01:15", "1:02:05")

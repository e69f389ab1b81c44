"""
Progress of the C{transcoder} command on stderr: tqdm bars on a terminal,
otherwise a plain line every tenth of the way and at each change of a
job's state.  Sizes are always in binary units (KiB, MiB, GiB), and times
left are shown once enough is done to estimate them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

# A time left is shown from this much progress (percent) and elapsed time (s):
# below, the estimate is mostly noise.
_ESTIMATE_FROM_PERCENT = 1.0
_ESTIMATE_FROM_SECONDS = 1.0

_FINISHED = ("succeeded", "failed", "cancelled")


def size(n: float) -> str:
    """C{1536} -> C{1.5 KiB}: the units of every size the command shows."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def duration(seconds: float) -> str:
    """C{75} -> C{01:15}, C{3725} -> C{1:02:05}: as tqdm shows the time elapsed."""
    from tqdm import tqdm

    text: str = tqdm.format_interval(max(0.0, seconds))
    return text


def time_left(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the average rate so far, or None while that says too little."""
    if total <= 0 or done <= 0 or done >= total or elapsed < _ESTIMATE_FROM_SECONDS:
        return None
    if done * 100 / total < _ESTIMATE_FROM_PERCENT:
        return None
    return elapsed * (total - done) / done


class Progress:
    """
    Upload, download and transcode progress on C{err}; C{tty} (default:
    whether C{err} is a terminal) chooses bars or lines; C{clock} gives the
    seconds for rates and times left.
    """

    def __init__(
        self,
        err: TextIO,
        quiet: bool,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._err = err
        self._quiet = quiet
        self._tty = err.isatty() if tty is None else tty
        self._clock = clock
        self._bar: Any = None
        self._step = -1
        self._state = ""
        self._started: float | None = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _new_bar(self, label: str, total: float | None, leave: bool) -> Any:
        from tqdm import tqdm

        known = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"
        return tqdm(
            total=total,
            desc=label,
            file=self._err,
            leave=leave,
            bar_format=known if total else "{desc}: {elapsed}{postfix}",
        )

    def bytes(self, label: str) -> Callable[[int, int], None]:
        """A C{(done, total)} callback for an upload or download (total -1: unknown)."""
        self._close_bar()
        self._step = -1
        started = self._clock()

        def report(done: int, total: int) -> None:
            if self._quiet:
                return
            elapsed = self._clock() - started
            if self._tty:
                if self._bar is None:
                    self._bar = self._new_bar(label, total if total > 0 else None, True)
                stats = [f"{size(done)} of {size(total)}" if total > 0 else size(done)]
                if elapsed > 0:
                    stats.append(f"{size(done / elapsed)}/s")
                left = time_left(done, total, elapsed)
                if left is not None:
                    stats.append(f"{duration(left)} left")
                self._bar.n = done
                self._bar.set_postfix_str(", ".join(stats), refresh=False)
                self._bar.refresh()
                return
            if total <= 0:
                return
            step = done * 10 // total
            if step != self._step:
                self._step = step
                print(
                    f"{label}: {done * 100 // total}% ({size(done)} of {size(total)})",
                    file=self._err,
                    flush=True,
                )

        return report

    def job(self, job: Any) -> None:
        """A callback for L{transcoder.client.api.Client.wait}."""
        if self._quiet:
            return
        if job.state == "running" and self._started is None:
            self._started = self._clock()
        progress = 100.0 if job.state == "succeeded" else min(float(job.progress), 100.0)
        left = None
        if job.state == "running" and self._started is not None:
            left = time_left(progress, 100.0, self._clock() - self._started)
        if self._tty:
            self._job_bar(job.state, progress, left)
            return
        step = int(progress // 10)
        if job.state != self._state or step != self._step:
            self._state, self._step = job.state, step
            more = f", {duration(left)} left" if left is not None else ""
            print(f"job {job.id}: {job.state} {progress:.0f}%{more}", file=self._err, flush=True)

    def _job_bar(self, state: str, progress: float, left: float | None) -> None:
        if state != self._state:
            if self._state != "running" or state not in _FINISHED:
                # A bar per state; the running one goes on to say how it ended.
                self._close_bar()
            self._state = state
        if self._bar is None:
            self._bar = self._new_bar(state, 100, leave=state != "queued")
        self._bar.set_description_str(state, refresh=False)
        self._bar.n = progress
        self._bar.set_postfix_str(f"{duration(left)} left" if left is not None else "", False)
        self._bar.refresh()
        if state in _FINISHED:
            self._close_bar()

    def close(self) -> None:
        self._close_bar()

"""
Tests for transcoder._loadorder: learning the LD_PRELOAD order that starts
ffprobe sooner, and keeping it only if every symbol binds as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from fakes import FakeReactor
from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from transcoder._loadorder import (
    ATTEMPTS,
    PreloadOrder,
    learn,
    main,
    mend_order,
    parse_bindings,
    rank_providers,
    reporter,
)
from transcoder.probe import probe, tool_env

if TYPE_CHECKING:
    from conftest import Clips


def _line(user: str, provider: str, symbol: str) -> bytes:
    return (
        f"     42:\tbinding file {user} [0] to {provider} [0]: normal symbol `{symbol}'"
        " [GLIBC_2.2.5]\n"
    ).encode()


PLAIN = b"".join(
    [
        b"     42:\tsome other line the loader prints\n",
        _line("/bin/tool", "/lib/libc.so.6", "malloc"),
        _line("/lib/liba.so", "/lib/liba.so", "a1"),
        _line("/lib/liba.so", "/lib/liba.so", "a2"),
        _line("/lib/libb.so", "/lib/libm.so.6", "frexp"),
        _line("linux-vdso.so.1", "linux-vdso.so.1", "__vdso_time"),
    ]
)


def test_parse_bindings_counts_each_binding() -> None:
    """Each 'binding file X to Y: symbol' line is one binding; other lines are ignored."""
    bindings = parse_bindings(PLAIN + _line("/lib/liba.so", "/lib/liba.so", "a1"))
    assert bindings[(b"/lib/liba.so", b"/lib/liba.so", b"normal symbol `a1' [GLIBC_2.2.5]")] == 2
    assert sum(bindings.values()) == 6


def test_rank_providers_leaves_out_the_program_itself() -> None:
    """A program can define what is bound (libpulse binds ffprobe's main) but is no library to preload."""
    bindings = parse_bindings(PLAIN + _line("/usr/lib/libpulse.so.0", "/usr/bin/ffprobe", "main"))
    assert b"/usr/bin/ffprobe" not in rank_providers(bindings)


def test_the_reporter_asks_for_every_binding(tmp_path: Path) -> None:
    """
    The tool runs with LD_DEBUG=bindings and LD_BIND_NOW=1 (so that the
    libraries bound lazily report too), the preload asked for, and its
    stderr is the report; a tool that fails gives none.
    """
    tool = tmp_path / "tool"
    tool.write_text('#!/bin/sh\necho "$LD_DEBUG $LD_BIND_NOW [$LD_PRELOAD] $*" >&2\n')
    tool.chmod(0o755)
    report = reporter(str(tool), ["-version"])
    plain = report(None)
    # The loader's own lines (the shell is dynamically linked), then the tool's.
    assert plain is not None and parse_bindings(plain)
    assert plain.splitlines()[-1] == b"bindings 1 [] -version"
    preloaded = report("/lib/x86_64-linux-gnu/libc.so.6")
    assert preloaded is not None
    assert preloaded.splitlines()[-1] == b"bindings 1 [/lib/x86_64-linux-gnu/libc.so.6] -version"
    tool.write_text("#!/bin/sh\nexit 1\n")
    assert report(None) is None


def test_rank_providers_most_bindings_first_without_the_vdso() -> None:
    """Providers are ranked by how many references they resolve; the vDSO is not a file to preload."""
    assert rank_providers(parse_bindings(PLAIN)) == [
        b"/lib/liba.so",
        b"/lib/libc.so.6",
        b"/lib/libm.so.6",
    ]


def test_mend_order_puts_the_old_provider_first() -> None:
    """A reference the preload moved to another library makes its old provider go just before the new one."""
    wanted = parse_bindings(PLAIN)
    got = parse_bindings(PLAIN.replace(b"to /lib/libm.so.6", b"to /lib/libc.so.6"))
    order = [b"/lib/liba.so", b"/lib/libc.so.6", b"/lib/libm.so.6"]
    assert mend_order(order, wanted, got) == [b"/lib/liba.so", b"/lib/libm.so.6", b"/lib/libc.so.6"]


def test_mend_order_gives_up_on_a_binding_it_cannot_explain() -> None:
    """A binding the plain start never made cannot be undone by an order: no order."""
    wanted = parse_bindings(PLAIN)
    got = wanted + parse_bindings(_line("/lib/libz.so", "/lib/libz.so", "z"))
    assert mend_order([b"/lib/liba.so"], wanted, got) is None


def test_mend_order_without_a_move_to_make() -> None:
    """Differences that the order already favours (the old provider is first) leave nothing to mend: no order."""
    wanted = parse_bindings(PLAIN)
    got = parse_bindings(PLAIN.replace(b"to /lib/libm.so.6", b"to /lib/libc.so.6"))
    order = [b"/lib/libm.so.6", b"/lib/libc.so.6"]
    assert mend_order(order, wanted, got) is None


class Reports:
    """Plays the loader: the report for each preload value asked for, in turn."""

    def __init__(self, *reports: bytes | None) -> None:
        self._reports = list(reports)
        self.asked: list[str | None] = []

    def __call__(self, preload: str | None) -> bytes | None:
        self.asked.append(preload)
        return self._reports.pop(0)


def test_learn_keeps_an_order_that_binds_the_same() -> None:
    """
    The tool runs plainly, then under the ranked order; a moved binding mends
    the order, and the order whose report equals the plain one is kept.
    """
    moved = PLAIN.replace(b"to /lib/libm.so.6", b"to /lib/libc.so.6")
    reports = Reports(PLAIN, moved, PLAIN)
    mended = "/lib/liba.so /lib/libm.so.6 /lib/libc.so.6"
    learnt = learn(reports)
    assert learnt is not None
    assert learnt.preload == mended
    # Everything the loader named, referencing or defining, but the vDSO.
    assert learnt.files == (
        "/bin/tool",
        "/lib/liba.so",
        "/lib/libb.so",
        "/lib/libc.so.6",
        "/lib/libm.so.6",
    )
    assert reports.asked == [None, "/lib/liba.so /lib/libc.so.6 /lib/libm.so.6", mended]


def test_learn_gives_up_after_a_few_orders() -> None:
    """
    An order that never binds the same is not kept: here the plain start
    binds frexp to libm and ldexp to libc, which no order can repeat, since
    whichever of the two comes first wins both.
    """
    plain = PLAIN + _line("/lib/libb.so", "/lib/libc.so.6", "ldexp")
    asked: list[str | None] = []

    def report(preload: str | None) -> bytes:
        asked.append(preload)
        if preload is None:
            return plain
        order = preload.split()
        first = min("/lib/libm.so.6", "/lib/libc.so.6", key=order.index)
        both = plain.replace(b"to /lib/libm.so.6", b"to /lib/libc.so.6")
        return both.replace(b"to /lib/libc.so.6", f"to {first}".encode())

    assert learn(report) is None
    assert len(asked) == 1 + ATTEMPTS


def test_learn_without_bindings() -> None:
    """A tool whose loader reports nothing (static, or no LD_DEBUG) gets no order."""
    reports = Reports(b"")
    assert learn(reports) is None
    assert reports.asked == [None]


def test_learn_when_the_tool_fails() -> None:
    """A tool that fails, plainly or under an order, gives no order."""
    assert learn(Reports(None)) is None
    assert learn(Reports(PLAIN, None)) is None


def test_main_prints_nothing_for_a_missing_tool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The learner run for a tool not on PATH prints no order, and exits 0."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["nothere"]) == 0
    assert capsys.readouterr().out == ""


class Learning:
    """
    A PreloadOrder on a fake reactor, for a tool and two libraries that are
    files in a temporary directory; the test plays the learner process.
    """

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        setsid: bool = True,
        no_group: bool = False,
    ) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        self.tool = bin_dir / "ffprobe"
        self.tool.write_text("#!/bin/sh\n")
        self.tool.chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if setsid else str(bin_dir)
        monkeypatch.setenv("PATH", path)
        # killpg raising ProcessLookupError: the learner is not yet through setsid().
        self.no_group = no_group
        self.libs = [tmp_path / "liba.so", tmp_path / "libc.so.6"]
        for lib in self.libs:
            lib.write_bytes(b"ELF")
        self.order_text = " ".join(map(str, self.libs))
        self.reactor = FakeReactor()
        self.killed: list[tuple[int, int]] = []
        self.order = PreloadOrder(self.reactor, "ffprobe", killpg=self.killpg)
        self.result: list[str | None] = []
        self.order.learn().addCallback(self.result.append)

    def killpg(self, pid: int, sig: int) -> None:
        if self.no_group:
            raise ProcessLookupError(pid)
        self.killed.append((pid, sig))

    @property
    def spawned(self) -> dict[str, Any]:
        spawned: dict[str, Any] = self.reactor.spawned[-1]
        return spawned

    def end(self, out: bytes | None = None, ok: bool = True) -> None:
        proto = self.spawned["proto"]
        if out is None:
            watched = [str(self.tool), *map(str, self.libs)]
            out = f"{self.order_text}\n{' '.join(watched)}\n".encode()
        proto.childDataReceived(1, out)
        proto.processEnded(Failure(ProcessDone(0) if ok else ProcessTerminated(exitCode=1)))


def test_the_learner_runs_in_a_process_group_of_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PreloadOrder runs this module's main through setsid, and keeps the order it prints."""
    learning = Learning(monkeypatch, tmp_path)
    args = learning.spawned["args"]
    assert os.path.basename(learning.spawned["executable"]) == "setsid"
    assert args[0] == "setsid"
    # -P: the package from the server's path, never from its working directory.
    assert args[2:] == ["-P", "-m", "transcoder._loadorder", "ffprobe"]
    assert learning.order.environment() == {}
    learning.end()
    assert learning.result == [learning.order_text]
    assert learning.order.value == learning.order_text
    assert learning.order.environment() == {"LD_PRELOAD": learning.order_text}


def test_no_order_printed_or_a_failed_learner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A learner that prints nothing, or fails, leaves the tool to run as it is."""
    learning = Learning(monkeypatch, tmp_path)
    learning.end(b"")
    assert learning.result == [None]
    assert learning.order.environment() == {}
    failed = Learning(monkeypatch, tmp_path)
    failed.end(ok=False)
    assert failed.result == [None]
    assert failed.order.environment() == {}


def test_an_order_naming_a_missing_library_is_not_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An order with a library that is no longer there when it arrives is dropped."""
    learning = Learning(monkeypatch, tmp_path)
    learning.libs[1].unlink()
    learning.end()
    assert learning.result == [None]
    assert learning.order.environment() == {}


@pytest.mark.parametrize("changed", ["tool", "library"])
def test_a_changed_tool_or_library_is_learnt_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, changed: str
) -> None:
    """
    When the tool or a library of the order is replaced (an upgrade under a
    running server), the order is dropped at the next check, at most 5 s
    later, and learnt again.
    """
    learning = Learning(monkeypatch, tmp_path)
    learning.end()
    target = learning.tool if changed == "tool" else learning.libs[0]
    replacement = target.with_name("new")
    replacement.write_bytes(b"ELF, upgraded")
    replacement.rename(target)
    # Not checked again before 5 s have passed.
    assert learning.order.environment() == {"LD_PRELOAD": learning.order_text}
    learning.reactor.advance(5)
    assert learning.order.environment() == {}
    assert len(learning.reactor.spawned) == 2
    # Asked again while learning: no second learner.
    learning.reactor.advance(5)
    assert learning.order.environment() == {}
    assert len(learning.reactor.spawned) == 2
    learning.end()
    assert learning.order.environment() == {"LD_PRELOAD": learning.order_text}


def test_unchanged_files_keep_the_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Checks that find every file as it was keep the order, and start no learner."""
    learning = Learning(monkeypatch, tmp_path)
    learning.end()
    for _ in range(3):
        learning.reactor.advance(5)
        assert learning.order.environment() == {"LD_PRELOAD": learning.order_text}
    assert len(learning.reactor.spawned) == 1


def test_stop_kills_the_learner_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Stopping while the learner runs kills its process group, and what it printed is not kept."""
    learning = Learning(monkeypatch, tmp_path)
    learning.order.stop()
    pid = learning.spawned["proto"].transport.pid
    assert learning.killed == [(pid, signal.SIGKILL)]
    learning.end(ok=False)
    assert learning.result == [None]
    assert learning.order.value is None
    # And nothing is learnt any more.
    again: list[str | None] = []
    learning.order.learn().addCallback(again.append)
    assert again == [None]
    assert len(learning.reactor.spawned) == 1


def test_stop_before_setsid_kills_the_learner_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Stopped before its setsid() ran (no group of its own yet), the learner process itself is killed."""
    learning = Learning(monkeypatch, tmp_path, no_group=True)
    learning.order.stop()
    assert learning.killed == []
    assert learning.spawned["proto"].transport.signals == ["KILL"]


def test_without_setsid_the_learner_is_killed_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where there is no setsid, the learner runs directly, and stopping kills that process."""
    learning = Learning(monkeypatch, tmp_path, setsid=False)
    assert learning.spawned["args"][1:] == ["-P", "-m", "transcoder._loadorder", "ffprobe"]
    learning.order.stop()
    assert learning.killed == []
    assert learning.spawned["proto"].transport.signals == ["KILL"]


def test_a_learning_without_order_starts_again_when_the_tool_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After a learning that gave no order (an upgrade half done, say), a change of the tool starts another."""
    learning = Learning(monkeypatch, tmp_path)
    learning.end(b"")
    learning.reactor.advance(5)
    assert learning.order.environment() == {}
    assert len(learning.reactor.spawned) == 1
    replacement = learning.tool.with_name("new")
    replacement.write_text("#!/bin/sh\n# upgraded\n")
    replacement.chmod(0o755)
    replacement.rename(learning.tool)
    learning.reactor.advance(5)
    assert learning.order.environment() == {}
    assert len(learning.reactor.spawned) == 2
    learning.end()
    assert learning.order.environment() == {"LD_PRELOAD": learning.order_text}


def test_a_learner_that_hangs_is_killed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A learner still running after two minutes is killed."""
    learning = Learning(monkeypatch, tmp_path)
    learning.reactor.advance(119)
    assert learning.killed == []
    learning.reactor.advance(1)
    assert learning.killed == [(learning.spawned["proto"].transport.pid, signal.SIGKILL)]


@pytest_twisted.ensureDeferred
async def test_learnt_order_binds_ffprobe_as_before(clips: Clips) -> None:
    """
    On this machine's ffprobe the learner (a real process) prints an order,
    under which the loader binds every reference to the same library as
    without it (checked here again, apart from the learning's own runs), and
    ffprobe says the same of each input.
    """
    order = PreloadOrder(reactor, "ffprobe")
    value = await order.learn()
    assert value is not None
    libraries = value.split()
    assert len(libraries) > 10
    assert all(os.path.isabs(lib) and ".so" in os.path.basename(lib) for lib in libraries)

    def bindings(extra: dict[str, str]) -> Counter[tuple[bytes, bytes, bytes]]:
        # Every reference, those of libraries bound lazily too.
        env = {**tool_env(), "LD_DEBUG": "bindings", "LD_BIND_NOW": "1", **extra}
        run = subprocess.run(["ffprobe", "-version"], env=env, capture_output=True, check=True)
        return parse_bindings(run.stderr)

    assert bindings({"LD_PRELOAD": value}) == bindings({})
    for clip in (clips.flv_video, clips.mp3_audio, clips.av):
        plain = await probe(reactor, clip)
        preloaded = await probe(reactor, clip, environment=order.environment())
        assert preloaded == plain

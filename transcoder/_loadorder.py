"""
A shared-library order that makes a dynamically linked tool start sooner.

Debian's ffprobe links about 215 shared libraries and is built with
C{BIND_NOW}, so 42,000 symbol references are resolved at start, each by
walking the libraries in the loader's breadth-first order until one defines
it.  perf put two thirds of its 45 ms start in that walk (C{do_lookup_x}),
and starting ffprobe is most of what probing a short input costs.  Naming
the libraries in C{LD_PRELOAD}, those that resolve the most references
first, makes most walks short: the same start took 29 to 34 ms against 45
to 55.

The order is learnt from the loader itself (C{LD_DEBUG=bindings}), and kept
only if every reference binds to the very library it binds to without it:
every one, since the learner also sets C{LD_BIND_NOW}, for the 86 libraries
that are not built to bind at start and would otherwise bind some
references only at their first call, out of the report's sight.
Where two libraries define one symbol (libc's and libm's C{frexp}, a C++
template instance in libstdc++ and in libjack), the one that won before must
still win: each such reference that moved makes its old provider go just
before its new one, and the loader is asked again, a few times at most.  A
tool that is not dynamically linked, a loader without C{LD_DEBUG}, or an
order that never settles gives no order, and the tool is run as it is.

The learning runs in a process of its own (C{python -m transcoder._loadorder
ffprobe}), which prints the order: the loader's reports are 7 MB each, and
the server's memory should not keep their traces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.probe import tool_env

_log = Logger()

# A binding the loader reports, as (referencing object, defining object,
# symbol with its version).  The namespace numbers are dropped: everything is
# loaded in the base namespace here.
Binding = tuple[bytes, bytes, bytes]
# What runs the tool under the loader's eye: the report for a preload value
# (None: none), or None if the tool failed.
Reporter = Callable[[str | None], bytes | None]

Fingerprint = tuple[tuple[int, int, int], ...]

_BINDING = re.compile(rb"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: (.*)$", re.MULTILINE)
# Orders tried at most (two were needed on this machine; each try is a quarter second).
ATTEMPTS = 8
# Seconds between two checks that the tool and its libraries are unchanged.
RECHECK = 5.0
_RUN_TIMEOUT = 20.0
# The learner's whole run, its tool's runs included.
_LEARN_TIMEOUT = 120.0


def parse_bindings(report: bytes) -> Counter[Binding]:
    """Every binding in the loader's C{LD_DEBUG=bindings} report, counted."""
    return Counter(_BINDING.findall(report))


def _is_library(name: bytes) -> bool:
    # Not the kernel's vDSO (no file), nor the program itself (libpulse binds
    # its "main"): a program cannot be preloaded, and the loader says so on
    # stderr each time it is asked to.
    return name.startswith(b"/") and b".so" in os.path.basename(name)


def rank_providers(bindings: Counter[Binding]) -> list[bytes]:
    """
    The shared libraries that define what is bound, those that resolve the
    most references first.
    """
    counts: Counter[bytes] = Counter()
    for (_, provider, _), n in bindings.items():
        if _is_library(provider):
            counts[provider] += n
    return [provider for provider, _ in counts.most_common()]


def loaded_files(bindings: Counter[Binding]) -> list[bytes]:
    """Every file the loader names, referencing or defining: what the order depends on."""
    return sorted(
        {
            name
            for user, provider, _ in bindings
            for name in (user, provider)
            if name.startswith(b"/")
        }
    )


def mend_order(
    order: Sequence[bytes], wanted: Counter[Binding], got: Counter[Binding]
) -> list[bytes] | None:
    """
    C{order} changed so that references the preload moved to another
    library go back to the one they bound to without it.

    @return: the new order, or C{None} when no change of order can undo the
        differences.
    """
    before = {(user, symbol): provider for user, provider, symbol in wanted}
    mended = list(order)
    moved = False
    for user, provider, symbol in got - wanted:
        old = before.get((user, symbol))
        if old is None or old not in mended or provider not in mended:
            return None
        i, j = mended.index(old), mended.index(provider)
        if i > j:
            mended.insert(j, mended.pop(i))
            moved = True
    return mended if moved else None


def fingerprint(paths: Sequence[str]) -> Fingerprint | None:
    """Each file's inode, size and mtime; C{None} if one is missing."""
    prints = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        prints.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(prints)


@dataclass(frozen=True)
class Learnt:
    """An order that binds as the plain start does, and the files it was learnt from."""

    preload: str
    files: tuple[str, ...]


def learn(report: Reporter) -> Learnt | None:
    """
    The C{LD_PRELOAD} value under which the tool C{report} runs binds every
    reference as its plain start does, or C{None}.
    """
    plain = report(None)
    if plain is None:
        return None
    wanted = parse_bindings(plain)
    if not wanted:
        return None
    order: list[bytes] | None = rank_providers(wanted)
    for _ in range(ATTEMPTS):
        assert order is not None
        # LD_PRELOAD splits on spaces and colons.
        if any(b" " in o or b":" in o for o in order):
            return None
        candidate = os.fsdecode(b" ".join(order))
        got = report(candidate)
        if got is None:
            return None
        bindings = parse_bindings(got)
        if bindings == wanted:
            return Learnt(candidate, tuple(map(os.fsdecode, loaded_files(wanted))))
        order = mend_order(order, wanted, bindings)
        if order is None:
            return None
    return None


def reporter(executable: str, args: Sequence[str]) -> Reporter:
    """
    Runs C{executable} with C{args} under C{LD_DEBUG=bindings}, in L{tool_env}.

    With C{LD_BIND_NOW} too: ffprobe is built to bind everything at start,
    but 86 of the libraries it loads are not, and their references are bound
    at their first call, which a report of the start would never show (two
    of them moved under an order learnt without it).
    """

    def report(preload: str | None) -> bytes | None:
        env = {**tool_env(), "LD_DEBUG": "bindings", "LD_BIND_NOW": "1"}
        if preload is not None:
            env["LD_PRELOAD"] = preload
        try:
            done = subprocess.run(
                [executable, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=_RUN_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stderr if done.returncode == 0 else None

    return report


def main(argv: Sequence[str]) -> int:
    """C{python -m transcoder._loadorder TOOL [ARG...]}: print TOOL's order, or nothing."""
    if not argv:
        print("usage: python -m transcoder._loadorder TOOL [ARG...]", file=sys.stderr)
        return 2
    executable = shutil.which(argv[0], path=tool_env()["PATH"])
    if executable is None:
        return 0
    learnt = learn(reporter(executable, list(argv[1:]) or ["-version"]))
    if learnt is not None:
        print(learnt.preload)
        print(" ".join(learnt.files))
    return 0


class _Learner(ProcessProtocol):
    def __init__(self, done: Deferred[Learnt | None]) -> None:
        self._done = done
        self._out = bytearray()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Two lines of a few hundred paths; stderr (a traceback at worst) is dropped.
        if childFD == 1 and len(self._out) < 1024 * 1024:
            self._out += data

    def processEnded(self, reason: Failure) -> None:
        lines = os.fsdecode(bytes(self._out)).splitlines()
        if isinstance(reason.value, ProcessDone) and len(lines) == 2 and lines[0].strip():
            self._done.callback(Learnt(lines[0].strip(), tuple(lines[1].split())))
        else:
            self._done.callback(None)


class PreloadOrder:
    """
    Learns, in a process of its own, the C{LD_PRELOAD} value that starts one
    tool soonest.

    A Debian upgrade under a running server can replace the tool and its
    libraries (new sonames), and the order would then name the old ones.  So
    the tool and every file the loader named while learning are checked
    (C{stat}, at most every L{RECHECK} seconds, when the order is asked for),
    and a change drops the order and learns again; after a learning that
    gave no order, a change of the tool starts another.

    @ivar value: the value learnt, or C{None} until then and if there is none.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        tool: str = "ffprobe",
        killpg: Callable[[int, int], None] = os.killpg,
    ) -> None:
        self._reactor = reactor
        self._tool = tool
        self._killpg = killpg
        self._clock = IReactorTime(reactor)
        self._learner: IProcessTransport | None = None
        self._group = False
        self._stopped = False
        # The files the last learning depended on, and what they were then.
        self._files: list[str] = []
        self._fingerprint: Fingerprint | None = None
        self._checked = 0.0
        self.value: str | None = None

    def environment(self) -> dict[str, str]:
        """What to add to the tool's environment: the preload once learnt, else nothing."""
        now = self._clock.seconds()
        if self._files and self._learner is None and now - self._checked >= RECHECK:
            self._checked = now
            if fingerprint(self._files) != self._fingerprint:
                _log.info("{tool} or its libraries changed: learning again", tool=self._tool)
                self.value = None
                self.learn().addErrback(lambda f: _log.failure("learning again", f))
        return {"LD_PRELOAD": self.value} if self.value else {}

    def learn(self) -> Deferred[str | None]:
        """
        Run the learner; fires with the value it printed (also kept as
        L{value}), or C{None}.
        """
        if self._stopped or self._learner is not None:
            return succeed(None)
        done: Deferred[Learnt | None] = Deferred()
        env = tool_env()
        executable = shutil.which(self._tool, path=env["PATH"])
        before = fingerprint([executable]) if executable else None
        # The learner imports this package from wherever the server does (-P:
        # and not from the server's working directory first).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        setsid = shutil.which("setsid", path=env["PATH"])
        learner = [sys.executable, "-P", "-m", "transcoder._loadorder", self._tool]
        # Its own process group, so that stop() ends the tool it runs too.
        args = ["setsid", *learner] if setsid else learner
        try:
            self._learner = self._reactor.spawnProcess(
                _Learner(done),
                setsid or sys.executable,
                args,
                env=env,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            _log.warn("cannot learn {tool}'s library order: {error}", tool=self._tool, error=e)
            return succeed(None)
        self._learner.closeStdin()
        self._group = setsid is not None
        timer = self._clock.callLater(_LEARN_TIMEOUT, self._kill)

        def learnt(result: Learnt | None) -> str | None:
            self._learner = None
            if timer.active():
                timer.cancel()
            if self._stopped:
                return None
            self._checked = self._clock.seconds()
            self._files = [executable] if executable else []
            self._fingerprint = before
            if result is not None and executable is not None:
                files = [executable, *result.files]
                now = fingerprint(files)
                # Nothing changed while learning, and nothing is gone.
                if now is not None and now[:1] == before:
                    self._files, self._fingerprint = files, now
                    self.value = result.preload
                    _log.info(
                        "{tool}: {n} libraries preloaded, in the order that binds soonest",
                        tool=self._tool,
                        n=len(result.preload.split()),
                    )
                    return self.value
            _log.info("{tool}: run as it is (no library order learnt)", tool=self._tool)
            return None

        return done.addCallback(learnt)

    def stop(self) -> None:
        """Stop learning: the learner and the tool it runs are killed."""
        self._stopped = True
        self._kill()

    def _kill(self) -> None:
        learner = self._learner
        if learner is None or learner.pid is None:
            return
        if self._group:
            try:
                self._killpg(learner.pid, signal.SIGKILL)
                return
            except ProcessLookupError:
                # Not yet through setsid(): no group of its own to signal.
                pass
            except PermissionError:
                return
        try:
            learner.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""
A shared-library order that makes a dynamically linked tool start sooner.

Debian's ffprobe links about 215 shared libraries and is built with
C{BIND_NOW}, so each of its 42,000 symbol references is resolved at start by
walking the libraries in the loader's breadth-first order until one defines
it.  perf put two thirds of its 45 ms start in that walk (C{do_lookup_x}),
and starting ffprobe is most of what probing a short input costs.  Naming
the libraries in C{LD_PRELOAD}, those that resolve the most references
first, makes most walks short: the same start took 29 ms.

The order is learnt from the loader itself (C{LD_DEBUG=bindings}), and kept
only if every reference binds to the very library it binds to without it.
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

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorProcess, IReactorTime
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
ATTEMPTS = 4
# Seconds between two checks that the tool and its libraries are unchanged.
RECHECK = 5.0
_RUN_TIMEOUT = 20.0
# The learner's whole run, its tool's runs included.
_LEARN_TIMEOUT = 120.0


def parse_bindings(report: bytes) -> Counter[Binding]:
    """Every binding in the loader's C{LD_DEBUG=bindings} report, counted."""
    return Counter(_BINDING.findall(report))


def rank_providers(bindings: Counter[Binding]) -> list[bytes]:
    """
    The objects that define what is bound, those that resolve the most
    references first; the kernel's vDSO, which is no file, left out.
    """
    counts: Counter[bytes] = Counter()
    for (_, provider, _), n in bindings.items():
        if provider.startswith(b"/"):
            counts[provider] += n
    return [provider for provider, _ in counts.most_common()]


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


def learn(report: Reporter) -> str | None:
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
            return candidate
        order = mend_order(order, wanted, bindings)
        if order is None:
            return None
    return None


def reporter(executable: str, args: Sequence[str]) -> Reporter:
    """Runs C{executable} with C{args} under C{LD_DEBUG=bindings}, in L{tool_env}."""

    def report(preload: str | None) -> bytes | None:
        env = {**tool_env(), "LD_DEBUG": "bindings"}
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
    value = learn(reporter(executable, list(argv[1:]) or ["-version"]))
    if value is not None:
        print(value)
    return 0


class _Learner(ProcessProtocol):
    def __init__(self, done: Deferred[str | None]) -> None:
        self._done = done
        self._out = bytearray()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # An order of a few hundred paths; stderr (a traceback at worst) is dropped.
        if childFD == 1 and len(self._out) < 1024 * 1024:
            self._out += data

    def processEnded(self, reason: Failure) -> None:
        if isinstance(reason.value, ProcessDone):
            value = os.fsdecode(bytes(self._out)).strip()
            self._done.callback(value or None)
        else:
            self._done.callback(None)


class PreloadOrder:
    """
    Learns, once, in a process of its own, the C{LD_PRELOAD} value that
    starts one tool soonest.

    A Debian upgrade under a running server can replace the tool and its
    libraries (new sonames), and the order would then name the old ones: so
    the tool and every library in the order are checked (C{stat}, at most
    every few seconds, when the order is asked for), and any change drops
    the order and learns a new one.

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
        self._pid: int | None = None
        self._learning = False
        self._stopped = False
        self._executable: str | None = None
        # What the files the order depends on were when it was learnt.
        self._files: list[str] = []
        self._fingerprint: Fingerprint | None = None
        self._checked = 0.0
        self.value: str | None = None

    def environment(self) -> dict[str, str]:
        """What to add to the tool's environment: the preload once learnt, else nothing."""
        if not self.value:
            return {}
        now = self._clock.seconds()
        if now - self._checked >= RECHECK:
            self._checked = now
            if fingerprint(self._files) != self._fingerprint:
                _log.info("{tool} or its libraries changed: learning again", tool=self._tool)
                self.value = None
                self.learn().addErrback(lambda f: _log.failure("learning again", f))
                return {}
        return {"LD_PRELOAD": self.value}

    def learn(self) -> Deferred[str | None]:
        """
        Run the learner; fires with the value it printed (also kept as
        L{value}), or C{None}.
        """
        if self._stopped or self._learning:
            return succeed(None)
        done: Deferred[str | None] = Deferred()
        env = tool_env()
        executable = shutil.which(self._tool, path=env["PATH"])
        before = fingerprint([executable]) if executable else None
        # The learner imports this package from wherever the server does.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        setsid = shutil.which("setsid", path=env["PATH"])
        learner = [sys.executable, "-m", "transcoder._loadorder", self._tool]
        # Its own process group, so that stop() ends the tool it runs too.
        args = ["setsid", *learner] if setsid else learner
        try:
            transport = self._reactor.spawnProcess(
                _Learner(done),
                setsid or sys.executable,
                args,
                env=env,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            _log.warn("cannot learn {tool}'s library order: {error}", tool=self._tool, error=e)
            return succeed(None)
        transport.closeStdin()
        self._learning = True
        self._pid = transport.pid if setsid else None
        timer = IReactorTime(self._reactor).callLater(_LEARN_TIMEOUT, self._kill)

        def learnt(value: str | None) -> str | None:
            self._pid = None
            self._learning = False
            if timer.active():
                timer.cancel()
            if self._stopped:
                return None
            if value is not None and executable is not None:
                files = [executable, *value.split()]
                now = fingerprint(files)
                if now is None or now[:1] != before:
                    # Changed while learning (or a library is already gone).
                    value = None
                else:
                    self._files, self._fingerprint = files, now
                    self._checked = self._clock.seconds()
            self.value = value
            if value is None:
                _log.info("{tool}: run as it is (no library order learnt)", tool=self._tool)
            else:
                _log.info(
                    "{tool}: {n} libraries preloaded, in the order that binds soonest",
                    tool=self._tool,
                    n=len(value.split()),
                )
            return value

        return done.addCallback(learnt)

    def stop(self) -> None:
        """Stop learning: the learner and the tool it runs are killed."""
        self._stopped = True
        self._kill()

    def _kill(self) -> None:
        if self._pid is not None:
            try:
                self._killpg(self._pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

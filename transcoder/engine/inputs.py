"""
Probing a job's inputs with ffprobe, beside its encoder or before it.

Each ffprobe run costs about 45 ms, which on a short encode is several percent
of the job, so the probes run beside the encoder when the inputs look like
media (L{transcoder.engine.sniff}); they still decide whether the job may
succeed.  Beside an encoder the probes run one after another, so that
together they take one core at most.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from transcoder.engine.deferreds import abandon
from transcoder.engine.probe import MediaInfo, NotMediaError
from transcoder.engine.runaway import too_long

# Seconds all of a job's input probes may take together (each ffprobe also
# has its own limit: see probe.probe).
PROBE_BUDGET = 60.0

_log = Logger()

ProbeFunction = Callable[[IReactorProcess, Path], Deferred[MediaInfo]]
# Every input's MediaInfo, in the profile's order, or why one is rejected.
Probed = list[MediaInfo] | str


class InputProbes:
    """
    The probes of C{inputs}, in the order of C{roles}; C{on_probed} is told
    what they found as soon as they have all answered (or one was rejected).

    @ivar probed: what they found, or C{None} while they run.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        probe: ProbeFunction,
        inputs: Mapping[str, Path],
        roles: Sequence[str],
        max_input_duration: float | None,
        on_probed: Callable[[Probed], None],
        needs: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.probed: Probed | None = None
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._probe = probe
        self._inputs = inputs
        self._roles = roles
        self._max_input_duration = max_input_duration
        self._on_probed = on_probed
        self._needs = needs or {}
        self._probing: Deferred[Probed] | None = None

    @property
    def started(self) -> bool:
        return self._probing is not None

    def start(self, together: bool) -> None:
        self._probing = Deferred.fromCoroutine(self._probe_all(together))
        self._probing.addCallback(self._done)

    def answer(self) -> Deferred[Probed]:
        """What the probes found, as a new Deferred each time it is awaited."""
        if self.probed is not None:
            return succeed(self.probed)
        assert self._probing is not None
        d: Deferred[Probed] = Deferred()

        def pass_on(result: object) -> object:
            if not d.called:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)  # type: ignore[arg-type]
            return result

        self._probing.addBoth(pass_on)
        return d

    def described(self) -> dict[str, dict[str, Any]] | None:
        """What the probes learnt of each input, by role, once they all answered."""
        if not isinstance(self.probed, list):
            return None
        return {role: info.describe() for role, info in zip(self._roles, self.probed, strict=False)}

    def abandon(self) -> None:
        if self._probing is not None:
            abandon(self._probing)

    def _done(self, probed: Probed) -> Probed:
        self.probed = probed
        self._on_probed(probed)
        return probed

    async def _probe_all(self, together: bool) -> Probed:
        """
        Every input's L{MediaInfo}, in the profile's order, or why one is rejected.

        @param together: start every probe at once (nothing else runs: the
            encoder waits for them), rather than one after another (beside an
            encoder, on a machine of two cores, two probes at once slow it
            down: mux-avi's 80 ms encode with its two probes took 93 ms with
            the probes at once, 74 ms with one after the other).
        """
        roles = self._roles
        # One budget for all of them: one after another, each with ffprobe's
        # own limit, two stuck probes would take twice as long.
        deadline = self._clock.seconds() + PROBE_BUDGET
        started = [self._probe_one(role) for role in roles] if together else []
        infos: list[MediaInfo] = []
        try:
            for i, role in enumerate(roles):
                if i == len(started):
                    started.append(self._probe_one(role))
                waiting = started[i]
                waiting.addTimeout(max(0.0, deadline - self._clock.seconds()), self._clock)
                try:
                    info = await waiting
                except CancelledError:
                    raise
                except DeferredTimeoutError:
                    return f"probing the inputs took more than {PROBE_BUDGET:g} s"
                except NotMediaError:
                    return f"not a recognised media file: {role}"
                except Exception as e:
                    _log.failure("probing input {role}", Failure(), role=role)
                    return f"could not probe input {role}: {e}"
                refused = too_long(role, info.duration, self._max_input_duration)
                if refused is not None:
                    return refused
                for kind in self._needs.get(role, ()):
                    if not info.codecs(kind):
                        return f"input {role} has no {kind} stream"
                infos.append(info)
        finally:
            for probing in started:
                abandon(probing)
        return infos

    def _probe_one(self, role: str) -> Deferred[MediaInfo]:
        return maybeDeferred(self._probe, self._reactor, self._inputs[role])

"""
What the registry asks of whatever runs a job's encoder.

L{transcoder.engine.runner.execute_job} is the real one; the registry takes
any L{Executor}, so that it can be built and tested without the engine
(L{transcoder.testing.FakeExecutor}).  The types are structural: the engine
does not import them.  L{Run} is the registry's record of one execution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from transcoder.core.jobs import Job, JobState, OutputFile
from transcoder.core.profiles import ParamValue, Profile

_log = Logger()


class Outcome(Protocol):
    """How an encoder run ended: what L{transcoder.engine.outcome.Outcome} offers."""

    @property
    def state(self) -> JobState: ...
    @property
    def output(self) -> OutputFile | None: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def log_tail(self) -> str | None: ...
    @property
    def outputs(self) -> list[OutputFile]: ...
    @property
    def inputs_media(self) -> dict[str, dict[str, Any]] | None: ...


class Execution(Protocol):
    """One encoder run: what L{transcoder.engine.runner.IJobExecution} offers."""

    @property
    def deferred(self) -> Deferred[Any]: ...
    def cancel(self) -> None: ...


class Executor(Protocol):
    """The signature of L{transcoder.engine.runner.execute_job}, which runs one job's encoder."""

    def __call__(
        self,
        reactor: Any,
        /,
        *,
        job_dir: Path,
        profile: Profile,
        inputs: Mapping[str, Path],
        params: Mapping[str, ParamValue],
        timeout: float | None,
        on_progress: Callable[[float], None],
        on_spawn: Callable[[int], None],
        kill_grace: float = ...,
        max_input_duration: float | None = ...,
        attempt: int = ...,
    ) -> Execution: ...


def default_executor() -> Executor:
    """The engine's executor, which runs real encoders."""
    # Imported here so the registry can be built and tested without the runner.
    from transcoder.engine.runner import execute_job

    return execute_job


@dataclass
class Ended:
    """An L{Outcome} the registry makes itself, for a run that never reached an encoder's end."""

    state: JobState
    output: OutputFile | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None
    outputs: list[OutputFile] = field(default_factory=list)
    inputs_media: dict[str, dict[str, Any]] | None = None


@dataclass(eq=False)
class Run:
    """One execution of a job, from the start of its encoder to its end."""

    job: Job
    last_saved: float
    execution: Execution | None = None
    cancel_requested: bool = False
    # Set by the registry's stop(): the job goes back to the queue instead of finishing.
    requeue: bool = False
    flush_call: IDelayedCall | None = None
    ended: list[Deferred[Job]] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop the encoder; an executor that fails to is logged, never raised."""
        assert self.execution is not None
        try:
            self.execution.cancel()
        except Exception:
            _log.failure("could not cancel the encoder of job {job_id}", job_id=self.job.id)

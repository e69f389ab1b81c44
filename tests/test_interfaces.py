"""The registry and the fakes that stand in for it provide the interfaces they claim, method by method."""

from __future__ import annotations

from pathlib import Path

from test_retention import FakeRegistry
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from transcoder.core.interfaces import IJobSource
from transcoder.core.jobs import IJobStore
from transcoder.core.registry import JobRegistry
from transcoder.testing import (
    FakeExecutor,
    FakeJobSource,
    FakeProcessTransport,
    FakeReactor,
    MemoryStore,
)


def test_the_registry_is_a_job_source(tmp_path: Path) -> None:
    """JobRegistry provides IJobSource, the one interface webhooks, metrics and retention use."""
    registry = JobRegistry(Clock(), MemoryStore(), tmp_path, {}, workers=1, executor=FakeExecutor())
    assert verifyObject(IJobSource, registry)


def test_the_fake_job_sources_are_job_sources() -> None:
    """The fakes the webhook, metrics and retention tests give in place of the registry provide IJobSource."""
    assert verifyObject(IJobSource, FakeJobSource())
    assert verifyObject(IJobSource, FakeRegistry([]))


def test_the_memory_store_is_a_job_store() -> None:
    """MemoryStore provides IJobStore, as the SQLite store does (tests/test_store.py)."""
    assert verifyObject(IJobStore, MemoryStore())


def test_the_fake_reactor_spawns_fake_processes() -> None:
    """FakeReactor provides IReactorProcess, and what its spawnProcess returns provides IProcessTransport."""
    reactor = FakeReactor()
    assert verifyObject(IReactorProcess, reactor)
    assert verifyObject(IProcessTransport, FakeProcessTransport(pid=1))

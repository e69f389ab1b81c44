"""The registry and the fakes that stand in for it provide the interfaces they claim, method by method."""

from __future__ import annotations

from pathlib import Path

from fakes import AnnouncingRegistry, FakeExecutor, MemoryStore
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from transcoder.core.interfaces import IJobSource
from transcoder.core.registry import JobRegistry


def test_the_registry_is_a_job_source(tmp_path: Path) -> None:
    """JobRegistry provides IJobSource, the one interface webhooks, metrics and retention use."""
    registry = JobRegistry(Clock(), MemoryStore(), tmp_path, {}, workers=1, executor=FakeExecutor())
    assert verifyObject(IJobSource, registry)


def test_the_fake_registry_is_a_job_source() -> None:
    """The fake the webhook and metrics tests give in place of the registry provides IJobSource."""
    assert verifyObject(IJobSource, AnnouncingRegistry())

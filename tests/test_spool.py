"""The spool writes bodies on its own thread, hashing as it goes, with bounded backlog and clean failure."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from transcoder.http.spool import Spool
from transcoder.http.writer import ALLOCATION_STEP


class FailingFile:
    """A file that fails with ENOSPC once C{limit} bytes were written."""

    def __init__(self, path: Path, limit: int) -> None:
        self.f = open(path, "xb")
        self.limit = limit
        self.written = 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()


class SlowFile:
    """A file whose writes wait until the test lets them go."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        self.f = open(path, "xb")
        self.gate = gate

    def write(self, data: bytes) -> int:
        self.gate.wait(10)
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()


def make_spool(**kw) -> tuple[Spool, list[bool], list[OSError]]:  # type: ignore[no-untyped-def]
    pressure: list[bool] = []
    errors: list[OSError] = []
    spool = Spool(reactor, on_pressure=pressure.append, on_error=errors.append, **kw)
    return spool, pressure, errors


async def settle(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Let the reactor run callFromThread calls until predicate() holds."""
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d


@pytest_twisted.ensureDeferred
async def test_files_are_written_in_order_with_their_digests(tmp_path: Path) -> None:
    """Several files written one after another keep their bytes, sizes, SHA-256 and (on request) MD5."""
    spool, _, errors = make_spool()
    chunks = {"a": [b"x" * 70000, b"y" * 3], "b": [b"z" * 100]}
    for name, parts in chunks.items():
        spool.open(tmp_path / name, md5=(name == "a"))
        for part in parts:
            spool.write(part)
        spool.close_file()
    files = await spool.finish()
    assert [f.path.name for f in files] == ["a", "b"]
    for f in files:
        data = b"".join(chunks[f.path.name])
        assert f.path.read_bytes() == data
        assert f.size == len(data)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert files[0].md5 == hashlib.md5(b"".join(chunks["a"])).hexdigest()
    assert files[1].md5 is None
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_backlog_above_high_water_pauses_then_resumes(tmp_path: Path) -> None:
    """More than high_water bytes waiting for a slow disk asks the reactor to pause reading, then to resume once drained."""
    gate = threading.Event()
    spool, pressure, _ = make_spool(opener=lambda p: SlowFile(p, gate), high_water=100_000)
    spool.open(tmp_path / "f")
    for _ in range(5):
        spool.write(b"x" * 30_000)
    assert pressure == [True]
    gate.set()
    spool.close_file()
    files = await spool.finish()
    await settle(lambda: pressure == [True, False])
    assert pressure == [True, False]
    assert files[0].size == 150_000


@pytest_twisted.ensureDeferred
async def test_disk_full_is_reported_once_and_abort_removes_the_files(tmp_path: Path) -> None:
    """ENOSPC while writing is reported once on the reactor thread; finish fails; abort removes every file and runs cleanup."""
    spool, _, errors = make_spool(opener=lambda p: FailingFile(p, 50_000))  # type: ignore[arg-type, return-value]
    spool.open(tmp_path / "f")
    for _ in range(10):
        spool.write(b"x" * 20_000)
    spool.close_file()
    d = spool.finish()
    with pytest.raises(OSError) as e:
        await d
    assert e.value.errno == errno.ENOSPC
    assert len(errors) == 1 and errors[0].errno == errno.ENOSPC
    cleaned = threading.Event()
    spool.abort(cleanup=cleaned.set)
    assert cleaned.wait(5)
    assert not (tmp_path / "f").exists()


@pytest_twisted.ensureDeferred
async def test_abort_mid_write_removes_partial_files(tmp_path: Path) -> None:
    """Aborting while writing stops the thread and removes what it wrote; a second abort is harmless."""
    spool, _, errors = make_spool()
    spool.open(tmp_path / "one")
    spool.write(b"a" * 1000)
    spool.close_file()
    spool.open(tmp_path / "two")
    spool.write(b"b" * 1000)
    cleaned = threading.Event()
    spool.abort(cleanup=cleaned.set)
    spool.abort()
    assert cleaned.wait(5)
    assert list(tmp_path.iterdir()) == []
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    """The default opener refuses to replace an existing file: that is an error, not a silent overwrite."""
    (tmp_path / "f").write_bytes(b"keep")
    spool, _, errors = make_spool()
    spool.open(tmp_path / "f")
    spool.write(b"new")
    spool.close_file()
    with pytest.raises(FileExistsError):
        await spool.finish()
    assert len(errors) == 1


@pytest_twisted.ensureDeferred
async def test_a_file_of_known_size_is_allocated_a_step_ahead_of_its_bytes(
    tmp_path: Path,
) -> None:
    """Opened with a declared size of 64 MiB, a file holds one 8 MiB step of blocks after its first 1000 bytes, not the declared 64 MiB (a slow client must not reserve what it has not sent); it grows a step at a time and ends with exactly the bytes written."""
    spool, _, errors = make_spool()
    path = tmp_path / "input"
    size = 64 << 20
    spool.open(path, size=size)
    spool.write(b"x" * 1000)
    # The allocation extends the file (fallocate without KEEP_SIZE).
    await settle(lambda: path.exists() and path.stat().st_size > 0)
    assert path.stat().st_size == ALLOCATION_STEP
    assert ALLOCATION_STEP <= path.stat().st_blocks * 512 < 2 * ALLOCATION_STEP
    data = os.urandom(size - 1000)
    spool.write(data[: 20 << 20])
    await settle(lambda: path.stat().st_size > 20 << 20)
    assert path.stat().st_size <= (20 << 20) + 1000 + ALLOCATION_STEP
    spool.write(data[20 << 20 :])
    spool.close_file()
    (f,) = await spool.finish()
    assert path.read_bytes() == b"x" * 1000 + data
    assert f.size == size == path.stat().st_size
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_no_space_for_the_allocation_is_reported_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the allocation is reported once, finish fails, and abort removes the file."""
    import transcoder.http.writer as writer_module

    def full(fd: int, offset: int, length: int) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_allocate", full)
    spool, _, errors = make_spool()
    path = tmp_path / "input"
    spool.open(path, size=1 << 20)
    spool.write(b"x" * 1000)
    spool.close_file()
    await settle(lambda: errors)
    assert [e.errno for e in errors] == [errno.ENOSPC]
    done: list[None] = []
    spool.abort(cleanup=lambda: done.append(None))
    await settle(lambda: done)
    assert not path.exists()


def test_uploads_in_a_crowd_each_hold_less() -> None:
    """An upload alone may queue 4 MiB and use four staging buffers; with others in flight each holds less, down to 1 MiB and two buffers, so that the server's memory does not grow with the number of uploads at once."""
    from transcoder.http.bodies import spool_limits

    assert spool_limits(1) == (4 << 20, 4)
    limits = [spool_limits(n) for n in range(1, 40)]
    assert limits == sorted(limits, reverse=True)
    assert spool_limits(16) == (1 << 20, 2)
    # What all of them may queue together: 6 MiB up to three, then 1 MiB each.
    for n, (high, _) in enumerate(limits, 1):
        assert high * n <= max(6 << 20, n << 20)


@pytest_twisted.ensureDeferred
async def test_a_lender_that_hashes_what_it_lends(tmp_path: Path) -> None:
    """hashes() hands over the open file's SHA-256 and MD5 once every byte written before is in them; buffers lent as hashed are written but not hashed again, and bytes written after go in as usual: the digests are those of the whole file."""
    import hashlib
    import threading

    spool, _, errors = make_spool()
    path = tmp_path / "input"
    spool.open(path, md5=True)
    head, lent, tail = os.urandom(70_001), os.urandom(3 << 20), os.urandom(5)
    spool.write(head)
    got: list[list[object] | None] = []
    # A lender asks from its own thread, and waits for the spool's thread.
    asking = threading.Thread(target=lambda: got.append(spool.hashes(lambda: False)))
    asking.start()
    await settle(lambda: bool(got))
    asking.join()
    (objects,) = got
    assert objects is not None and len(objects) == 2
    for h in objects:
        h.update(lent)  # type: ignore[attr-defined]
    given: list[bool] = []
    spool.lend(memoryview(bytearray(lent)), lambda: given.append(True), hashed=True)
    spool.write(tail)
    spool.close_file()
    (f,) = await spool.finish()
    whole = head + lent + tail
    assert path.read_bytes() == whole
    assert f.sha256 == hashlib.sha256(whole).hexdigest()
    assert f.md5 == hashlib.md5(whole).hexdigest()
    assert given == [True] and errors == []


@pytest_twisted.ensureDeferred
async def test_hashes_without_an_open_file_is_none(tmp_path: Path) -> None:
    """With no file open (or the spool stopped while waiting), hashes() answers None: the lender leaves the hashing to the spool."""
    import threading

    spool, _, _ = make_spool()
    got: list[object] = []
    asking = threading.Thread(target=lambda: got.append(spool.hashes(lambda: False)))
    asking.start()
    await settle(lambda: bool(got))
    asking.join()
    assert got == [None]
    spool.abort()

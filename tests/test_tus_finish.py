"""
Making the job of a finished tus upload when the registry refuses it, or
after a crash between storing the job and recording it in the upload: the
logic, over a real registry on a memory job store that fails on demand, the
memory upload store, and real files.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from transcoder.core.jobs import InputFile
from transcoder.core.profiles import builtin_profiles
from transcoder.core.registry import JobRegistry
from transcoder.core.storewriter import STORE_RECHECK
from transcoder.core.submit import UPLOADS_KEY, Submission, submit
from transcoder.core.uploads import InProcessUploadLocks, MemoryUploadStore, Upload, new_upload_id
from transcoder.http.errors import APIError
from transcoder.http.tusfinish import job_id_for
from transcoder.http.tusjobs import FromUploads
from transcoder.http.tusupload import TusUploads
from transcoder.testing import FakeExecutor, MemoryStore

FULL = OSError(errno.ENOSPC, "database or disk is full")


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = clock = Clock()
        clock.advance(1_700_000_000)
        self.jobs = MemoryStore()
        self.profiles = builtin_profiles()
        self.registry = JobRegistry(
            clock, self.jobs, tmp_path, self.profiles, workers=0, executor=FakeExecutor()
        )
        self.registry.start()
        self.store = MemoryUploadStore()
        self.reported: list[tuple[str, int]] = []
        self.uploads = TusUploads(
            reactor,
            self.registry,
            self.profiles,
            self.store,
            InProcessUploadLocks(reactor),
            tmp_path,
            1 << 30,
            3600.0,
        )
        self.uploads.report = lambda outcome, n: self.reported.append((outcome, n))

    async def upload(self, data: bytes, **metadata: str) -> Upload:
        """An upload whose bytes are all on disk, with no job yet: as its last PATCH leaves it."""
        uid = new_upload_id()
        checked = self.uploads.check_metadata(metadata)
        filename = self.uploads.new_file(uid, checked["role"], checked["display"])
        (self.uploads.upload_dir(uid) / filename).write_bytes(data)
        u = Upload(uid, None, len(data), 0, metadata, 0.0, 1e12, filename, extra=checked)
        await self.store.create(u)
        return u

    async def last_patch(self, u: Upload, data: bytes) -> Upload:
        """The PATCH that brings every byte: its lock, its hash, then the record and the job."""
        prep = await self.uploads.prepare(u.id, None, 0, len(data), None, None)
        prep.sha.update(data)
        done: Upload = await self.uploads.patched(prep, len(data), True, True)
        return done

    def job_dirs(self) -> list[str]:
        jobs = self.registry.job_dir(job_id_for(new_upload_id())).parent
        return sorted(p.name for p in jobs.iterdir()) if jobs.is_dir() else []


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest_twisted.ensureDeferred
async def test_a_refused_job_keeps_the_upload_complete_and_a_later_pass_makes_it(
    world: World,
) -> None:
    """The job store fails (disk full) as the last PATCH ends: 507 with Retry-After and the offset kept, the upload's file kept, no job; once the store takes writes, the retried last PATCH makes the one job, with the file's SHA-256, and a later pass makes no other."""
    data = b"abcdefgh" * 1000
    u = await world.upload(data, profile="mp4-h264", filename="clip.flv")
    world.jobs.failing = FULL
    with pytest.raises(APIError) as refused:
        await world.last_patch(u, data)
    e = refused.value
    assert e.status == 507 and e.code == "insufficient_storage"
    assert e.headers["Retry-After"] and e.headers["Upload-Offset"] == str(len(data))
    assert e.headers["Tus-Resumable"] == "1.0.0"
    kept = await world.store.get(u.id)
    assert kept is not None and kept.complete and kept.job_id is None
    assert (world.uploads.upload_dir(u.id) / u.filename).read_bytes() == data
    assert world.registry.jobs() == [] and world.job_dirs() == []
    assert list(world.registry.uploads_dir.iterdir()) == []

    # Still failing: a retry is refused the same way, nothing lost.
    with pytest.raises(APIError):
        await world.uploads.retry_complete(kept)
    assert (world.uploads.upload_dir(u.id) / u.filename).exists()

    world.jobs.failing = None
    # The client retries its last PATCH (at the offset it had sent it from):
    # the job is made, and the 409 names it, as for any repeated last PATCH.
    with pytest.raises(APIError) as repeated:
        await world.uploads.prepare(u.id, None, 0, len(data), None, None)
    assert repeated.value.status == 409
    (job,) = world.registry.jobs()
    assert repeated.value.headers["Job-Location"] == f"/jobs/{job.id}"
    again = await world.store.get(u.id)
    assert again is not None and job.id == job_id_for(u.id) and again.job_id == job.id
    assert job.inputs[0].sha256 == hashlib.sha256(data).hexdigest()
    assert job.inputs[0].filename == "clip.flv" and job.extra[UPLOADS_KEY] == [u.id]
    assert (world.registry.job_dir(job.id) / u.filename).read_bytes() == data
    assert not world.uploads.upload_dir(u.id).exists()
    assert world.reported == [("created", 0)]
    await world.uploads.finisher.reconcile()
    assert len(world.registry.jobs()) == 1


@pytest_twisted.ensureDeferred
async def test_the_reconcile_pass_makes_the_job_of_a_refused_upload(world: World) -> None:
    """A finished upload whose job was refused (shutting down aside) gets it from the next pass, without any request."""
    data = b"x" * 5000
    u = await world.upload(data, profile="mp4-h264")
    world.jobs.failing = RuntimeError("the database went away")
    with pytest.raises(APIError) as refused:
        await world.last_patch(u, data)
    assert refused.value.status == 503 and refused.value.code == "store_unavailable"
    world.jobs.failing = None
    await world.uploads.finisher.reconcile()
    (job,) = world.registry.jobs()
    got = await world.store.get(u.id)
    assert got is not None and got.job_id == job.id == job_id_for(u.id)


@pytest_twisted.ensureDeferred
async def test_reconcile_completes_the_record_of_a_job_stored_before_a_crash(
    world: World,
) -> None:
    """The job was stored but the upload's record names none (a crash came between): the pass records the job, removes the files left, and makes no second job."""
    data = b"y" * 3000
    u = await world.upload(data, profile="mp4-h264", filename="v.flv")
    # What the finisher does up to the crash: link the file, submit the job.
    job_id = job_id_for(u.id)
    staging = world.registry.uploads_dir / job_id
    staging.mkdir(parents=True)
    (staging / u.filename).hardlink_to(world.uploads.upload_dir(u.id) / u.filename)
    digest = hashlib.sha256(data).hexdigest()
    profile = world.profiles["mp4-h264"]
    await submit(
        world.registry,
        Submission(job_id, staging, profile, profile.validate_params({}),
                   [InputFile("file", "v.flv", len(data), digest, u.filename)]),
        None,
    )  # fmt: skip
    assert await world.store.update_offset(u.id, 0, len(data), 1e12)
    assert (await world.store.get(u.id)).job_id is None  # type: ignore[union-attr]

    await world.uploads.finisher.reconcile()
    got = await world.store.get(u.id)
    assert got is not None and got.job_id == job_id
    assert len(world.registry.jobs()) == 1
    assert not world.uploads.upload_dir(u.id).exists()
    # The job's own file is intact.
    assert (world.registry.job_dir(job_id) / u.filename).read_bytes() == data


def _request(**args: str) -> Any:
    return SimpleNamespace(args={k.encode(): [v.encode()] for k, v in args.items()}, owner=None)


@pytest_twisted.ensureDeferred
async def test_inputs_named_by_post_jobs_stay_usable_when_the_job_is_refused(
    world: World,
) -> None:
    """POST /jobs from uploads whose job the store refuses leaves the uploads complete and unused (their files and locks too): the same request then makes the job, and only then are they used."""
    parts = {"video": b"v" * 4000, "audio": b"a" * 2000}
    ids: dict[str, str] = {}
    for role, data in parts.items():
        u = await world.upload(data, input=role, filename=f"{role}.bin")
        await world.last_patch(u, data)
        ids[role] = u.id
        assert (await world.store.get(u.id)).job_id == ""  # type: ignore[union-attr]
    query = {"profile": "mux-avi", **{f"upload.{r}": i for r, i in ids.items()}}

    world.jobs.failing = FULL
    body = FromUploads(world.uploads, _request(**query))
    submission = await body.finish()
    with pytest.raises(OSError):
        await submit(world.registry, submission, None)
    for role, uid in ids.items():
        got = await world.store.get(uid)
        assert got is not None and got.job_id == ""
        assert (world.uploads.upload_dir(uid) / got.filename).read_bytes() == parts[role]
        assert not world.uploads.locks.held(uid)
    assert world.registry.jobs() == []

    world.jobs.failing = None
    # The registry takes uploads again once its check of the store passes.
    world.clock.advance(STORE_RECHECK + 1)
    submission = await FromUploads(world.uploads, _request(**query)).finish()
    job = await submit(world.registry, submission, None)
    assert job.id == job_id_for(*ids.values())
    assert {i.name: i.sha256 for i in job.inputs} == {
        r: hashlib.sha256(d).hexdigest() for r, d in parts.items()
    }
    for uid in ids.values():
        got = await world.store.get(uid)
        assert got is not None and got.job_id == job.id
        assert not world.uploads.upload_dir(uid).exists()
        assert not world.uploads.locks.held(uid)


def _head(world: World, upload_id: str) -> Any:
    from twisted.web.test.requesthelper import DummyRequest

    from transcoder.http.tus import UploadResource

    request = DummyRequest([])
    request.method = b"HEAD"
    request.requestHeaders.setRawHeaders(b"tus-resumable", [b"1.0.0"])
    request.answered = request.notifyFinish()
    UploadResource(world.uploads, upload_id).render(request)
    return request


@pytest_twisted.ensureDeferred
async def test_head_makes_the_job_of_a_complete_upload_once_the_server_can(
    world: World,
) -> None:
    """HEAD on a complete upload whose job was refused: 503 with Retry-After and Upload-Offset while the store still fails; once it takes writes, 200 with Job-Location, the one job made."""
    data = b"z" * 2000
    u = await world.upload(data, profile="mp4-h264")
    world.jobs.failing = RuntimeError("the database went away")
    with pytest.raises(APIError):
        await world.last_patch(u, data)
    request = _head(world, u.id)
    await request.answered
    assert request.responseCode == 503
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"retry-after") and headers.getRawHeaders(b"upload-offset") == [
        str(len(data)).encode()
    ]
    world.jobs.failing = None
    request = _head(world, u.id)
    await request.answered
    assert request.responseCode == 200
    (job,) = world.registry.jobs()
    assert request.responseHeaders.getRawHeaders(b"job-location") == [f"/jobs/{job.id}".encode()]
    assert request.responseHeaders.getRawHeaders(b"upload-offset") == [str(len(data)).encode()]

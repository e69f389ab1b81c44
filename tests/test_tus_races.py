"""
tus uploads where requests, the reconcile pass and refusals meet: a PATCH
whose body is in while another request comes, a client gone while its PATCH
waited, a store failing during a pass, another node's request, a digest
mismatch, an empty deferred length, bad ids in POST /jobs.  The logic, over
the world of L{test_tus_finish} (a real registry, memory stores, real files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_tus_finish import World, _request
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from transcoder.core.pguploadlocks import lock_key
from transcoder.core.uploads import (
    InProcessUploadLocks,
    IUploadLock,
    MemoryUploadStore,
    Upload,
    new_upload_id,
)
from transcoder.http.bodies import IBodyReceiver, IRequestBody
from transcoder.http.errors import APIError
from transcoder.http.tus import UploadResource, UploadsResource, _Created, _NoBody
from transcoder.http.tusbody import TusPatchBody
from transcoder.http.tusfinish import job_id_for
from transcoder.http.tusjobs import FromUploads


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _use_store(world: World, store: MemoryUploadStore) -> None:
    world.store = store
    world.uploads.store = store


@pytest_twisted.ensureDeferred
async def test_a_patch_recording_its_offset_is_not_failed_by_a_later_request(
    world: World,
) -> None:
    """A PATCH whose body is all in, still recording its offset when another request for the upload comes, is not asked to fail (its client would get a second answer): the later request waits for it, then gets the upload."""
    u = await world.upload(b"f" * 10, profile="mp4-h264")
    body = TusPatchBody(world.uploads, world.uploads.prepare(u.id, None, 0, 0, None, None), 0)
    fatal: list[object] = []
    body.onFatal = fatal.append
    answered = body.finish()
    # Syncing the file on a thread: the PATCH holds the upload meanwhile.
    assert world.uploads.locks.held(u.id)
    waiting = world.uploads.locks.acquire(u.id, lambda: None)
    assert fatal == []
    done = await answered
    assert done.offset == 0
    lock = await waiting
    assert lock.upload_id == u.id
    lock.release()


@pytest_twisted.ensureDeferred
async def test_a_patch_whose_client_left_while_it_waited_leaves_the_gauge_at_zero(
    world: World,
) -> None:
    """A PATCH that waits for the upload while another holds it, and whose client goes before it gets it, is not left counted in the PATCHes-in-flight gauge once it has the upload and lets go."""
    events: list[tuple[str, int]] = []
    world.uploads.event = lambda what, n: events.append((what, n))
    u = await world.upload(b"x" * 100, profile="mp4-h264")
    first = await world.uploads.prepare(u.id, None, 0, 10, None, None)
    body = TusPatchBody(world.uploads, world.uploads.prepare(u.id, None, 0, 10, None, None), 10)
    assert body.upload is None
    body.abort()
    # The first PATCH ends (nothing written): the waiting one gets the upload, then lets go.
    await world.uploads.patched(first, 0, False, True)
    assert body.upload is not None and not world.uploads.locks.held(u.id)
    assert [n for what, n in events if what == "patches"] == [1, -1, 1, -1]


class _FlakyStore(MemoryUploadStore):
    """Its C{get} fails once for the ids in C{failing}, as a database that went away a moment."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    def get(self, upload_id: str) -> Deferred[Upload | None]:
        if upload_id in self.failing:
            self.failing.discard(upload_id)
            return fail(OSError("the upload database went away"))
        return super().get(upload_id)


async def _refused(world: World, data: bytes) -> Upload:
    """An upload whose last PATCH is in but whose job the registry refused."""
    u = await world.upload(data, profile="mp4-h264")
    world.jobs.failing = RuntimeError("the database went away")
    with pytest.raises(APIError):
        await world.last_patch(u, data)
    world.jobs.failing = None
    return u


@pytest_twisted.ensureDeferred
async def test_a_store_failure_during_a_pass_does_not_stop_the_passes(world: World) -> None:
    """A reconcile pass that cannot read one upload's record logs it and goes on with the others, and fires (a failed pass would stop the LoopingCall, and with it every later one); the next pass makes the job it missed."""
    store = _FlakyStore()
    _use_store(world, store)
    a = await _refused(world, b"a" * 3000)
    b = await _refused(world, b"b" * 3000)
    store.failing = {a.id}
    await world.uploads.finisher.reconcile()
    got_a, got_b = await store.get(a.id), await store.get(b.id)
    assert got_a is not None and got_a.job_id is None
    assert got_b is not None and got_b.job_id == job_id_for(b.id)
    await world.uploads.finisher.reconcile()
    got_a = await store.get(a.id)
    assert got_a is not None and got_a.job_id == job_id_for(a.id)
    assert len(world.registry.jobs()) == 2


class _OtherNodeLocks(InProcessUploadLocks):
    """Locks whose holders are on another node: C{held} (this node's) says no."""

    def held(self, upload_id: str) -> bool:
        return False


@pytest_twisted.ensureDeferred
async def test_a_pass_never_asks_a_request_on_another_node_to_stop(world: World) -> None:
    """A complete upload held by a request on another node (its last PATCH, a HEAD, making the job) is left to it by the reconcile pass: the holder is not asked to stop and the pass does not wait for it."""
    u = await _refused(world, b"c" * 3000)
    locks = _OtherNodeLocks(Clock())
    world.uploads.locks = locks
    asked: list[str] = []
    held = await locks.acquire(u.id, lambda: asked.append(u.id))
    done = world.uploads.finisher.reconcile()
    assert asked == [] and done.called
    await done
    held.release()
    got = await world.store.get(u.id)
    assert got is not None and got.job_id is None and world.registry.jobs() == []


class _SlowTerminate(MemoryUploadStore):
    """Forgets an upload one reactor turn after it is asked to, as a database does."""

    def terminate(self, upload_id: str) -> Deferred[None]:
        return deferLater(reactor, 0, self.uploads.pop, upload_id, None).addCallback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_a_digest_mismatch_forgets_the_upload_before_answering(world: World) -> None:
    """The last PATCH of an upload whose bytes do not hash to its sha256 metadata answers 400 only once the record is gone and then lets go of the upload: a HEAD or a pass meanwhile cannot find it complete, with its file gone."""
    _use_store(world, _SlowTerminate())
    data = b"d" * 3000
    u = await world.upload(data, profile="mp4-h264", sha256="0" * 64)
    with pytest.raises(APIError) as refused:
        await world.last_patch(u, data)
    assert refused.value.status == 400 and refused.value.code == "digest_mismatch"
    assert world.store.uploads == {}
    assert not world.uploads.upload_dir(u.id).exists()
    assert not world.uploads.locks.held(u.id) and world.registry.jobs() == []


@pytest_twisted.ensureDeferred
async def test_a_deferred_length_of_zero_is_refused(world: World) -> None:
    """A PATCH that declares a deferred length of 0 gets 400 empty_body (as POST /uploads with Upload-Length: 0 does): the length stays deferred and no job is made of an empty file."""
    uid = new_upload_id()
    metadata = {"profile": "mp4-h264"}
    checked = world.uploads.check_metadata(metadata)
    filename = world.uploads.new_file(uid, checked["role"], checked["display"])
    await world.store.create(
        Upload(uid, None, None, 0, metadata, 0.0, 1e12, filename, extra=checked)
    )
    with pytest.raises(APIError) as refused:
        await world.uploads.prepare(uid, None, 0, 0, 0, None)
    assert refused.value.status == 400 and refused.value.code == "empty_body"
    assert refused.value.headers["Tus-Resumable"] == "1.0.0"
    got = await world.store.get(uid)
    assert got is not None and got.length is None
    assert not world.uploads.locks.held(uid) and world.registry.jobs() == []


class _KeyedLocks(InProcessUploadLocks):
    """Derives each upload's lock key as the PostgreSQL locks do (on a Clock: nobody times out)."""

    def acquire(self, upload_id: str, stop: Any) -> Deferred[IUploadLock]:
        lock_key(upload_id)
        return super().acquire(upload_id, stop)


def _post_jobs_refusal(world: World, **query: str) -> APIError:
    """What POST /jobs naming uploads answers, when it is refused without waiting."""
    try:
        d = FromUploads(world.uploads, _request(**query)).finish()
    except APIError as e:
        return e
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "not refused at once"
    assert isinstance(failures[0].value, APIError), failures[0].value
    return failures[0].value


@pytest_twisted.ensureDeferred
async def test_post_jobs_checks_the_upload_ids_before_locking_them(world: World) -> None:
    """POST /jobs naming uploads: an id that is no upload id is 404 before any lock is taken (the cluster's lock key is made from it: no 500), and one upload named for two inputs is 422 at once (it would wait on its own lock, then 423)."""
    world.uploads.locks = _KeyedLocks(Clock())
    video = await world.upload(b"v" * 3000, input="video", filename="v.flv")
    await world.last_patch(video, b"v" * 3000)
    bad = _post_jobs_refusal(
        world, profile="mux-avi", **{"upload.video": video.id, "upload.audio": "../../x"}
    )
    assert bad.status == 404 and bad.code == "not_found" and "upload.audio" in bad.message
    twice = _post_jobs_refusal(
        world, profile="mux-avi", **{"upload.video": video.id, "upload.audio": video.id}
    )
    assert twice.status == 422 and twice.code == "bad_input"
    assert not world.uploads.locks.held(video.id)
    got = await world.store.get(video.id)
    assert got is not None and got.job_id == ""


@pytest_twisted.ensureDeferred
async def test_tus_bodies_and_resources_provide_their_interfaces(world: World) -> None:
    """The tus request bodies provide IRequestBody and the tus resources IBodyReceiver."""
    u = await world.upload(b"e" * 100, profile="mp4-h264")
    patch_body = TusPatchBody(world.uploads, world.uploads.prepare(u.id, None, 0, 0, None, None), 0)
    verifyObject(IRequestBody, patch_body)
    patch_body.abort()
    assert not world.uploads.locks.held(u.id)
    verifyObject(IRequestBody, _Created(u, Deferred()))
    verifyObject(IRequestBody, _NoBody())
    video = await world.upload(b"v" * 100, input="video")
    await world.last_patch(video, b"v" * 100)
    audio = await world.upload(b"a" * 100, input="audio")
    await world.last_patch(audio, b"a" * 100)
    query = {"profile": "mux-avi", "upload.video": video.id, "upload.audio": audio.id}
    from_uploads = FromUploads(world.uploads, _request(**query))
    verifyObject(IRequestBody, from_uploads)
    from_uploads.abort()
    verifyObject(IBodyReceiver, UploadsResource(world.uploads))
    verifyObject(IBodyReceiver, UploadResource(world.uploads, u.id))


class _TurnLocks(InProcessUploadLocks):
    """Grants each lock a reactor turn later, so that two requests' acquisitions interleave."""

    def acquire(self, upload_id: str, stop: Any) -> Deferred[IUploadLock]:
        return deferLater(reactor, 0, lambda: None).addCallback(
            lambda _: super(_TurnLocks, self).acquire(upload_id, stop)
        )


@pytest_twisted.ensureDeferred
async def test_post_jobs_naming_the_same_uploads_in_other_orders_do_not_wait_on_each_other(
    world: World,
) -> None:
    """Two POST /jobs naming the same uploads in different orders take their locks in id order: the first gets its job at once (no 423 after each held one lock and waited 5 s on the other's), the second follows once it lets go; each job lists its inputs in its request's order."""
    world.uploads.locks = _TurnLocks(reactor)
    ids: dict[str, str] = {}
    for role, data in {"video": b"v" * 400, "audio": b"a" * 200}.items():
        u = await world.upload(data, input=role, filename=f"{role}.bin")
        await world.last_patch(u, data)
        ids[role] = u.id
    one = {"profile": "mux-avi", "upload.video": ids["video"], "upload.audio": ids["audio"]}
    other = {"profile": "mux-avi", "upload.audio": ids["audio"], "upload.video": ids["video"]}
    first = FromUploads(world.uploads, _request(**one)).finish()
    second = FromUploads(world.uploads, _request(**other)).finish()
    got = await first
    assert [i.name for i in got.inputs] == ["video", "audio"]
    assert not second.called
    assert got.refused is not None
    got.refused(Failure(RuntimeError("refused")))
    then = await second
    assert then.job_id == got.job_id and [i.name for i in then.inputs] == ["audio", "video"]
    assert then.refused is not None
    then.refused(Failure(RuntimeError("refused")))
    assert not any(world.uploads.locks.held(i) for i in ids.values())


@pytest_twisted.ensureDeferred
async def test_a_deferred_length_below_the_bytes_received_is_400(world: World) -> None:
    """A PATCH declaring a deferred length below the bytes already received gets 400 bad_length saying so (not 413 past the maximum), with the real Upload-Offset; the length stays deferred."""
    uid = new_upload_id()
    metadata = {"profile": "mp4-h264"}
    checked = world.uploads.check_metadata(metadata)
    filename = world.uploads.new_file(uid, checked["role"], checked["display"])
    (world.uploads.upload_dir(uid) / filename).write_bytes(b"x" * 10)
    await world.store.create(
        Upload(uid, None, None, 10, metadata, 0.0, 1e12, filename, extra=checked)
    )
    with pytest.raises(APIError) as refused:
        await world.uploads.prepare(uid, None, 10, 0, 5, None)
    e = refused.value
    assert e.status == 400 and e.code == "bad_length"
    assert "below" in e.message and "10 bytes received" in e.message
    assert e.headers["Upload-Offset"] == "10" and e.headers["Tus-Resumable"] == "1.0.0"
    got = await world.store.get(uid)
    assert got is not None and got.length is None
    assert not world.uploads.locks.held(uid)

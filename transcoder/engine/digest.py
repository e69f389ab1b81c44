"""The SHA-256 of an encoder's output, and whether the file changed since."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

_HASH_CHUNK = 1024 * 1024

HashFunction = Callable[[Path], Deferred[str]]

# A file's inode, size and mtime: whether it changed since.
Fingerprint = tuple[int, int, int]


def fingerprint(path: Path) -> Fingerprint | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    # One buffer read into again and again: a new bytes object per chunk
    # made hashing a 5 MB result a fifth slower (measured), and the hash is
    # now what the job waits for after its encoder.
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def hash_in_pool(threads: IReactorThreads, path: Path) -> Deferred[str]:
    """The SHA-256 of C{path} as hex, computed in the reactor's thread pool."""
    # Off the reactor thread: hashing a big result takes seconds.
    return deferToThreadPool(threads, threads.getThreadPool(), sha256_file, path)

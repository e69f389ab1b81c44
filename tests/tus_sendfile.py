"""
A tus client for big files that holds none of their bytes: each PATCH's body
goes from the file to the socket with sendfile(2), as a byte range.  Blocking
and standard library only.  (The bench's client, bench/tus_client.py, reads
and writes instead, as curl does: on loopback sendfile shifts CPU from the
client to the server, which a memory test does not mind and a CPU bench does.)
"""

from __future__ import annotations

import os
from typing import BinaryIO

from tusraw import OCTETS, TUS, Answer, connect, metadata, read_answer, request_bytes


def create(port: int, length: int, **meta: str) -> str:
    """POST /uploads for C{length} bytes with C{meta}; the upload's path."""
    headers = {**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata(**meta)}
    with connect(port) as sock:
        sock.sendall(request_bytes("POST", "/uploads", headers, 0))
        answer = read_answer(sock)
    if answer.status != 201:
        raise AssertionError(f"POST /uploads: {answer.status} {answer.body!r}")
    return answer["Location"]


def patch_range(port: int, location: str, f: BinaryIO, offset: int, count: int) -> Answer:
    """PATCH bytes [offset, offset + count) of the open file C{f} at that offset."""
    headers = {**TUS, **OCTETS, "Upload-Offset": str(offset)}
    with connect(port) as sock:
        sock.sendall(request_bytes("PATCH", location, headers, count))
        # os.sendfile under the socket's timeout: no byte passes through Python.
        if sock.sendfile(f, offset, count) != count:
            raise OSError("the file is shorter than the upload")
        return read_answer(sock)


def upload_file(port: int, path: str, chunk: int, **meta: str) -> Answer:
    """The whole file as tus PATCHes of C{chunk} bytes; the last PATCH's answer."""
    size = os.path.getsize(path)
    location = create(port, size, **meta)
    with open(path, "rb") as f:
        offset = 0
        answer = None
        while offset < size:
            count = min(chunk, size - offset)
            answer = patch_range(port, location, f, offset, count)
            if answer.status != 204 or answer["Upload-Offset"] != str(offset + count):
                raise AssertionError(f"PATCH at {offset}: {answer.status} {answer.body!r}")
            offset += count
    assert answer is not None
    return answer

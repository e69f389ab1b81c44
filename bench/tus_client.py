#!/usr/bin/env python3
"""A tus 1.0 client that costs next to nothing: the bench's client for the tus row.

usage: tus_client.py BASE_URL FILE CHUNK_BYTES [key=value ...]

Creates an upload of FILE's size at BASE_URL/uploads with the key=value pairs as its
Upload-Metadata, then sends FILE as PATCHes of CHUNK_BYTES, one connection each.  Each
body is read and written 1 MiB at a time, into one buffer made once: as curl -T sends a
file (read, then write), not with sendfile(2).  On loopback the way the client sends
changes what the server's receive costs: the same plain upload sent with sendfile cost
the server 0.2 s/GiB more than curl's (docs/performance.md, "Resumable uploads").
Prints the last answer's Job-Location.  Standard library only.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from urllib.parse import urlsplit

BUFFER = 1 << 20


def request(method: str, path: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """The status and headers of the answer (its body, if any, is left unread)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise SystemExit(f"the server closed the connection: {data!r}")
        data += more
    status_line, *lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    base, path, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
    meta = dict(kv.split("=", 1) for kv in sys.argv[4:])
    where = urlsplit(base)
    address = (where.hostname or "127.0.0.1", where.port or 80)
    size = os.path.getsize(path)
    tus = {"Tus-Resumable": "1.0.0"}
    encoded = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items())
    with socket.create_connection(address) as sock:
        head = {**tus, "Upload-Length": str(size), "Upload-Metadata": encoded}
        sock.sendall(request("POST", where.path.rstrip("/") + "/uploads", head, 0))
        status, headers = answer(sock)
    if status != 201:
        raise SystemExit(f"POST /uploads: {status}")
    location = headers["location"]
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while offset < size:
            count = min(chunk, size - offset)
            head = {
                **tus,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset),
            }
            with socket.create_connection(address) as sock:
                sock.sendall(request("PATCH", location, head, count))
                f.seek(offset)
                left = count
                while left:
                    n = f.readinto(view[: min(left, BUFFER)])
                    if not n:
                        raise SystemExit(f"{path} is shorter than it was")
                    sock.sendall(view[:n])
                    left -= n
                status, headers = answer(sock)
            if status != 204 or headers.get("upload-offset") != str(offset + count):
                raise SystemExit(f"PATCH at {offset}: {status} {headers}")
            offset += count
    print(headers.get("job-location", ""))


if __name__ == "__main__":
    main()

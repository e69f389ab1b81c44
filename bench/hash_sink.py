"""
The least a server that hashes an upload can do, for comparing against
(docs/performance.md): accept one connection, skip the request head, read
1 GiB into a 2 MiB ring buffer PIECE bytes at a time (MSG_WAITALL with a
low-water mark, as transcoder.http.pump does), SHA-256 each piece if HASH, answer
200.  No HTTP parsing, no disk.  Prints its own CPU seconds on stderr.

usage: hash_sink.py PORT RCVBUF(0=auto) LOWAT PIECE HASH(0/1)
then:  curl -sS -o /dev/null -X PUT -T 1GiB.bin -H Expect: http://127.0.0.1:PORT/
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

SO_RCVBUFFORCE = 33  # root only: past net.core.rmem_max, as the pump does
BODY = 1 << 30


def main() -> None:
    port, rcvbuf, lowat, piece, dohash = map(int, sys.argv[1:6])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1)
    conn, _ = server.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(1)
    if rcvbuf:
        conn.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    if lowat > 1:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
    view = memoryview(bytearray(2 << 20))
    sha = hashlib.sha256()
    flags = socket.MSG_WAITALL if lowat > 1 else 0
    got = at = 0
    while got < BODY:
        n = min(piece, BODY - got, len(view) - at)
        k = conn.recv_into(view[at : at + n], n, flags)
        if not k:
            break
        if dohash:
            sha.update(view[at : at + k])
        got += k
        at = (at + k) % len(view)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    conn.close()
    t = os.times()
    print(f"sink cpu {t.user + t.system:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()

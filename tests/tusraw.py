"""A blocking raw-HTTP client for the tus tests: the server runs in another process."""

from __future__ import annotations

import base64
import json
import socket
from dataclasses import dataclass
from typing import Any

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __getitem__(self, name: str) -> str:
        return self.headers[name.lower()]

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def metadata(**pairs: str) -> str:
    return ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}" if v else k for k, v in pairs.items()
    )


def read_answer(sock: socket.socket, head: bool = False) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    header, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = header.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            break
        rest += more
    return Answer(int(status_line.split()[1]), headers, rest[:length])


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def request_bytes(method: str, path: str, headers: dict[str, str], length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    tus: bool = True,
) -> Answer:
    """One request on a new connection; the whole answer."""
    h = dict(TUS) if tus else {}
    h.update(headers or {})
    length = len(body) if body or method in ("POST", "PATCH", "PUT") else None
    with connect(port) as sock:
        sock.sendall(request_bytes(method, path, h, length) + body)
        return read_answer(sock, head=method == "HEAD")

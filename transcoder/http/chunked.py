"""
The framing of a chunked body (RFC 9112, section 7.1), read by a
L{transcoder.http.pump.SocketPump} that takes such a body over from the HTTP
channel: where the body stands when it does (L{Chunked}), and the parser
(L{Framing}) that tells the pump what to read next without ever asking for a
byte that a valid body might not hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Chunked:
    """
    Where a chunked body stands as a pump takes it over: C{left} bytes of
    the current chunk still to come, then (if C{crlf}) the CRLF that ends a
    chunk's data, then a size line; at most C{limit} more bytes of data.
    """

    left: int
    crlf: bool
    limit: int


class MalformedChunk(ValueError):
    """Chunked framing that breaks RFC 9112's rules."""


class TooLarge(Exception):
    """A chunk past what is left of the body's size limit."""


# As twisted.web.http's decoder has them.
MAX_SIZE_LINE = 1024
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_EXTENSION = re.compile(rb"[\t !-\[\]-~\x80-\xff]*")

# Framing read at most at once: a size line's end, and the data after it.
SCRATCH = 80
# After a chunk's data the body holds at least CRLF, "0" CRLF and CRLF.
AFTER_DATA = 7


class Framing:
    """
    The framing of a chunked body (RFC 9112, section 7.1), as a pump reads
    it.  It never asks for a byte that a valid body might not have, so that
    a pump never reads into a pipelined request: after a chunk's data come
    at least seven bytes (CRLF, the last chunk's "0" CRLF, and CRLF).
    """

    def __init__(self, state: Chunked) -> None:
        self.left = state.left
        self.crlf = state.crlf
        self.limit = state.limit
        #: Framing received and not yet understood: the start of a size line
        #: (after the CRLF ending a chunk's data, if C{crlf}).
        self.pending = bytearray()
        #: The last chunk's size line has begun (it is in C{pending}).
        self.last = False
        # What L{line_ends} and L{after} saw last.
        self._line = b""
        self._size = 0
        self._tail = b""
        self._next = b""

    def line_ends(self) -> int:
        """
        The size of the next chunk when its size line is all here but its
        LF (where a chunk's 7 bytes after data end, with curl's 4-digit
        sizes), else 0.  Lines repeat, so the last one's size is kept.
        """
        pending = self.pending
        if self.left or self.crlf or not pending.endswith(b"\r"):
            return 0
        line = bytes(pending[:-1])
        if line != self._line:
            self._size = _chunk_size(line)
            self._line = line
        return self._size

    def chunk(self, size: int) -> None:
        """The line from L{line_ends}, its LF and its C{size} bytes of data were received."""
        if size > self.limit:
            raise TooLarge()
        self.limit -= size
        self.pending.clear()
        self.crlf = True

    def after(self, tail: memoryview, out: bytearray) -> None:
        """
        The bytes after a chunk's data, mostly the same as the last time:
        its CRLF and the start of the next size line (and data, after a
        short line, which goes to C{out}).
        """
        if tail == self._tail:
            self.pending[:] = self._next
            self.crlf = False
            return
        self.parse(tail, out)
        if not out and not self.left and not self.crlf and not self.last:
            self._tail = bytes(tail)
            self._next = bytes(self.pending)

    def received(self, n: int) -> None:
        """C{n} bytes of the current chunk's data went straight into a buffer."""
        self.left -= n
        if not self.left:
            self.crlf = True

    def plan(self) -> list[tuple[str, int]]:
        """What the next read should take: data or framing, and how much."""
        if self.left:
            return [("data", self.left), ("framing", AFTER_DATA)]
        pending = self.pending
        if self.crlf:
            return [("framing", 2 - len(pending) + 5)]
        size, _, _ = bytes(pending).partition(b";")
        size = size.rstrip(b"\r")
        value = int(size, 16) if size else 0
        if pending.endswith(b"\r"):
            # The line ends with the next byte (a CR is nowhere else in a
            # valid one): then come its data, and what follows data.
            if value == 0:
                return [("framing", 1)]
            return [("framing", 1), ("data", value), ("framing", AFTER_DATA)]
        if value == 0:
            # Perhaps the last chunk: its line's CRLF and the body's last CRLF.
            return [("framing", 3)]
        # A longer size line: at least its CRLF, then data, then 7 more.
        return [("framing", min(SCRATCH, value + 8))]

    def parse(self, data: memoryview, out: bytearray) -> None:
        """Take framing bytes; the data among them is added to C{out}."""
        pending = self.pending
        pending += data
        i = 0
        while i < len(pending) and not self.last:
            if self.left:
                k = min(self.left, len(pending) - i)
                out += pending[i : i + k]
                i += k
                self.received(k)
            elif self.crlf:
                if bytes(pending[i : i + 2]) not in (b"\r\n", b"\r"):
                    raise MalformedChunk("a chunk's data did not end with CRLF")
                if len(pending) - i < 2:
                    break
                i += 2
                self.crlf = False
            else:
                eol = pending.find(b"\r\n", i)
                if eol == -1:
                    line = pending[i:]
                    if len(line) > MAX_SIZE_LINE:
                        raise MalformedChunk(
                            f"a chunk size line is longer than {MAX_SIZE_LINE} bytes"
                        )
                    size = line.partition(b";")[0].rstrip(b"\r")
                    if (size and not _HEX.fullmatch(size)) or b"\r" in line[:-1]:
                        raise MalformedChunk("a chunk size is not a hexadecimal number")
                    break
                value = _chunk_size(bytes(pending[i:eol]))
                if value == 0:
                    # Left for the HTTP channel, with what follows it.
                    self.last = True
                    break
                if value > self.limit:
                    raise TooLarge()
                self.limit -= value
                self.left = value
                i = eol + 2
        del pending[:i]


def _chunk_size(line: bytes) -> int:
    size, _, extension = line.partition(b";")
    if not _HEX.fullmatch(size):
        raise MalformedChunk("a chunk size is not a hexadecimal number")
    if extension and not _EXTENSION.fullmatch(extension):
        raise MalformedChunk("a chunk extension holds characters it may not")
    return int(size, 16)

"""A strict decoder for chunked request bodies that re-frames them. Pure.

Request bodies that arrive chunked are decoded and encoded again, so the
backend receives chunks lbc produced itself: no chunk extensions, no
trailers, no oversized or malformed size lines passed through. Anything
malformed raises ChunkError (the client gets 400).
"""

from __future__ import annotations

MAX_SIZE_LINE = 1024
MAX_TRAILERS = 16 * 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")

SIZE, DATA, DATA_CRLF, TRAILERS, DONE = range(5)


class ChunkError(Exception):
    pass


class ChunkedDecoder:
    __slots__ = ("state", "left", "line", "trailer_bytes", "total")

    def __init__(self) -> None:
        self.state = SIZE
        self.left = 0
        self.line = bytearray()
        self.trailer_bytes = 0
        self.total = 0  # decoded body bytes so far

    @property
    def done(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Decode as much of `data` as belongs to the body. Returns the
        re-framed bytes to send and how many input bytes were consumed
        (less than len(data) only when the body ended inside it)."""
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n and self.state != DONE:
            if self.state == DATA:
                take = min(self.left, n - pos)
                out.append(b"%x\r\n" % take + data[pos : pos + take] + b"\r\n")
                self.left -= take
                self.total += take
                pos += take
                if not self.left:
                    self.state = DATA_CRLF
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._grow(data[pos:])
                pos = n
                break
            self._grow(data[pos : end + 1])
            pos = end + 1
            line = bytes(self.line)
            self.line.clear()
            if not line.endswith(b"\r\n"):
                raise ChunkError("chunked body line without CRLF")
            line = line[:-2]
            if self.state == SIZE:
                size_text = line.split(b";", 1)[0]
                if not size_text or len(size_text) > 16 or not set(size_text) <= _HEX:
                    raise ChunkError("bad chunk size")
                size = int(size_text, 16)
                if size:
                    self.left, self.state = size, DATA
                else:
                    self.state = TRAILERS
            elif self.state == DATA_CRLF:
                if line:
                    raise ChunkError("chunk data longer than its size")
                self.state = SIZE
            else:  # TRAILERS: dropped; an empty line ends the body
                if not line:
                    self.state = DONE
                    out.append(b"0\r\n\r\n")
                else:
                    self.trailer_bytes += len(line)
                    if self.trailer_bytes > MAX_TRAILERS:
                        raise ChunkError("chunked trailers too large")
        return b"".join(out), pos

    def _grow(self, piece: bytes) -> None:
        self.line += piece
        if len(self.line) > MAX_SIZE_LINE:
            raise ChunkError("chunk size line too long")

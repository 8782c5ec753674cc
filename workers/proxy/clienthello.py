"""The server name (SNI) of a TLS ClientHello, read without decrypting
anything: what a tls_passthrough listener routes on. Pure: bytes in, a
result out.

`parse(data)` takes every byte the client has sent so far and answers one of

    NeedMore(at_least)  a proper prefix of something that may still be a
                        ClientHello within the limit: read more, at least
                        up to `at_least` bytes before parsing again;
    ClientHello(name)   a whole ClientHello; `server_name` is its host name
                        (lowercase ASCII, no trailing dot, as routes are
                        compiled), or None when it names none;
    Malformed(reason)   anything else: close without touching a backend.

Strict, because the name picks a backend and the backend reads the same
bytes: a hello that two parsers could read differently is refused rather
than guessed at. Every length must fit its enclosing block exactly (record,
handshake message, session id, cipher suites, compression methods, the
extension block, each extension, the server_name list), no extension type
may repeat (RFC 8446 4.2), and server_name must hold exactly one host_name
(as OpenSSL requires of it). A name with bytes a DNS name cannot have is
refused; an IP address, which RFC 6066 forbids there, counts as no name,
the same as a client that connects by address and, as it should, sends none.

Records: a ClientHello may be split over several handshake records (type 22,
version 3.x, 1 to 2^14 bytes each), with no other record between them
(RFC 8446 5.1). SSL 2 compatible hellos are not TLS records and are refused.
Bytes after the ClientHello are the client's business and are not looked at.

Bounded: the records up to the end of the ClientHello must fit in `limit`
bytes (16 KiB by default; real ones are 0.2 to 2 KB). A length that
promises more is refused as soon as it is read, not after the bytes arrive,
so a NeedMore always means fewer than `limit` bytes are held. And cheap to
call again: each parse walks every record so far, so a caller parses again
only once it holds `at_least` bytes, where the ClientHello could end if the
rest came in one record. The worst case, 16 KiB of 1-byte records sent a
byte at a time, then costs about 65 parses (some 70 ms of CPU, about what a
TLS handshake costs per byte received) instead of one per byte (13 s).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_CLIENT_HELLO = 16 * 1024
HANDSHAKE = 22  # TLS record content type
CLIENT_HELLO = 1  # handshake message type
SERVER_NAME = 0  # extension type
HOST_NAME = 0  # server name type
MAX_RECORD = 1 << 14  # RFC 8446 5.1: TLSPlaintext.length
_LABELS = re.compile(rb"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """No ClientHello can be complete in fewer than `at_least` bytes (at
    most `limit`): parsing again sooner could only find an error sooner."""

    at_least: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: bytes | None


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str


Result = NeedMore | ClientHello | Malformed


def parse(data: bytes, limit: int = MAX_CLIENT_HELLO) -> Result:
    """Read the ClientHello at the start of `data` (see the module docstring)."""
    fragments: list[bytes] = []
    have = 0  # handshake bytes in `fragments`
    need = 0  # the whole handshake message's length, once its header is in
    pos = 0  # where the next record starts
    while True:
        if pos + 5 + max(need - have, 1) > limit:  # even if the rest came in one record
            return Malformed(f"ClientHello does not fit in {limit} bytes")
        header = data[pos : pos + 5]
        if header[:1] and header[0] != HANDSHAKE:
            first = "not TLS: first byte" if pos == 0 else "record of type"
            return Malformed(f"{first} {header[0]:#04x}, not a handshake record")
        if header[1:2] and header[1] != 3 or header[2:3] and header[2] > 4:
            return Malformed(f"record version {header[1:3].hex()} is not TLS")
        if len(header) < 5:
            return NeedMore(pos + 5 + need - have if need else len(data) + 1)
        length = int.from_bytes(header[3:5])
        if not 0 < length <= MAX_RECORD:
            return Malformed(f"record length {length} outside 1..{MAX_RECORD}")
        end = pos + 5 + length
        if end > limit:
            return Malformed(f"ClientHello does not fit in {limit} bytes")
        fragment = data[pos + 5 : end]
        before = have  # handshake bytes in earlier records
        fragments.append(fragment)
        have += len(fragment)
        if need == 0 and have:
            if fragments[0][0] != CLIENT_HELLO:
                return Malformed(f"handshake message type {fragments[0][0]}, not a ClientHello")
            if have >= 4:
                need = 4 + int.from_bytes(b"".join(fragments)[1:4])
                if pos + 5 + need - before > limit:
                    return Malformed(f"ClientHello of {need} bytes does not fit in {limit} bytes")
        if need and have >= need:
            return _hello(b"".join(fragments)[4:need])
        if len(fragment) < length:
            return NeedMore(min(end, pos + 5 + need - before) if need else len(data) + 1)
        pos = end


class _Bad(Exception):
    pass


class _Block:
    """A cursor over one length-delimited block: every read is checked
    against the block's end."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise _Bad(f"{what} runs past its enclosing block")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what))

    def vector(self, size: int, what: str) -> _Block:
        """A block preceded by its `size`-byte length."""
        n = self.number(size, f"{what} length")
        self.take(n, what)
        return _Block(self.data, self.pos - n, self.pos)


def _hello(body: bytes) -> ClientHello | Malformed:
    try:
        return ClientHello(_server_name(body))
    except _Bad as e:
        return Malformed(str(e))


def _server_name(body: bytes) -> bytes | None:
    b = _Block(body)
    version = b.number(2, "client version")
    if version >> 8 != 3:
        raise _Bad(f"client version {version:#06x} is not TLS")
    b.take(32, "random")
    if b.vector(1, "session id").left() > 32:
        raise _Bad("session id longer than 32 bytes")
    suites = b.vector(2, "cipher suites").left()
    if suites == 0 or suites % 2:
        raise _Bad(f"cipher suites of {suites} bytes")
    if b.vector(1, "compression methods").left() == 0:
        raise _Bad("no compression method")
    if b.left() == 0:
        return None  # no extensions (TLS 1.2 allows that)
    extensions = b.vector(2, "extensions")
    if b.left():
        raise _Bad(f"{b.left()} bytes after the extensions")
    seen: set[int] = set()
    name = None
    while extensions.left():
        kind = extensions.number(2, "extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise _Bad(f"extension {kind} repeated")
        seen.add(kind)
        if kind == SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(ext: _Block) -> bytes | None:
    names = ext.vector(2, "server name list")
    if ext.left():
        raise _Bad(f"{ext.left()} bytes after the server name list")
    if not names.left():
        raise _Bad("empty server name list")
    if names.number(1, "server name type") != HOST_NAME:
        raise _Bad("server name is not a host_name")
    raw = names.vector(2, "host name")
    if names.left():
        raise _Bad("more than one server name")
    name = raw.take(raw.left(), "host name").lower()
    if not name:
        raise _Bad("empty host name")
    if name.endswith(b"."):
        name = name[:-1]  # routes are compiled without it
    if _is_address(name):
        return None
    if len(name) > 253 or not _LABELS.fullmatch(name):
        raise _Bad(f"host name {name[:64]!r} is not a DNS name")
    return name


def _is_address(name: bytes) -> bool:
    """An IP literal, or what resolvers would take for one: a last label of
    digits (no top-level domain is numeric: 10.1 and 1.2.3.4.5 are not names)."""
    if name.rpartition(b".")[2].isdigit():
        return True
    if b":" in name:
        try:
            ipaddress.IPv6Address(name.removeprefix(b"[").removesuffix(b"]").decode("ascii"))
        except ValueError:
            return False
        return True
    return False

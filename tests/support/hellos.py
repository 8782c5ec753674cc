"""TLS ClientHellos for tests: real ones from Python's ssl, and hand-made
ones whose every length field the test can find and break."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field


def capture(name: str | None, *, max_version: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of Python's TLS client asking for `name`: one
    record holding the ClientHello (Python sends no SNI for an address)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = name is not None
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake cannot finish without a server")


def records(handshake: bytes, sizes, version: bytes = b"\x03\x01") -> bytes:
    """`handshake` re-cut into records of the given sizes (cycled)."""
    sizes = list(sizes)
    out = bytearray()
    i = n = 0
    while i < len(handshake):
        piece = handshake[i : i + sizes[n % len(sizes)]]
        out += b"\x16" + version + len(piece).to_bytes(2) + piece
        i += len(piece)
        n += 1
    return bytes(out)


@dataclass
class Built:
    data: bytes
    lengths: dict[str, tuple[int, int]] = field(default_factory=dict)  # field -> (offset, size)

    def with_length(self, name: str, delta: int) -> bytes:
        """The hello with one length field changed by `delta`."""
        at, size = self.lengths[name]
        value = int.from_bytes(self.data[at : at + size]) + delta
        return self.data[:at] + value.to_bytes(size) + self.data[at + size :]


def build(server_name: bytes | None = b"a.example.test", *, extensions: list[tuple[int, bytes]] = (),
          session_id: bytes = bytes(32), suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
          compression: bytes = b"\x00", client_version: bytes = b"\x03\x03", with_extensions: bool = True,
          server_names: list[tuple[int, bytes]] | None = None) -> Built:
    """A ClientHello in one record, with the server_name extension first (for
    `server_name`, or the raw `server_names` entries), then `extensions`."""
    lengths: dict[str, tuple[int, int]] = {}
    body = bytearray(client_version + bytes(range(32)))

    def vector(name: str, size: int, data: bytes) -> None:
        lengths[name] = (9 + len(body), size)  # offsets in the whole record
        body.extend(len(data).to_bytes(size) + data)

    vector("session id", 1, session_id)
    vector("cipher suites", 2, suites)
    vector("compression methods", 1, compression)
    if with_extensions:
        entries = server_names if server_names is not None else [(0, server_name)] if server_name is not None else []
        block = bytearray()
        ext_at = 9 + len(body) + 2
        if entries:
            names = b"".join(bytes([kind]) + len(n).to_bytes(2) + n for kind, n in entries)
            lengths["server_name extension"] = (ext_at + 2, 2)
            lengths["server name list"] = (ext_at + 4, 2)
            lengths["host name"] = (ext_at + 7, 2)
            block += b"\x00\x00" + (len(names) + 2).to_bytes(2) + len(names).to_bytes(2) + names
        for kind, data in extensions:
            block += kind.to_bytes(2) + len(data).to_bytes(2) + data
        vector("extensions", 2, bytes(block))
    handshake = b"\x01" + len(body).to_bytes(3) + body
    lengths["record"] = (3, 2)
    lengths["handshake"] = (6, 3)
    return Built(b"\x16\x03\x01" + len(handshake).to_bytes(2) + handshake, lengths)

"""HTTP/1.1 message heads, without I/O: raw head bytes in, a decision out.

The proxy forwards request and response heads as raw bytes instead of
re-serializing every header, so it must be sure the bytes are unambiguous
before it passes them on. Rules, in the order they apply to a request head
(everything up to and including the blank line):

1. llhttp (httptools, strict mode) has accepted the head before it gets here,
   which is the C-speed gate: it rejects bare CR or LF line endings, NUL and
   other control bytes, obs-fold, spaces before a colon, invalid methods and
   targets, Content-Length together with Transfer-Encoding, repeated or
   non-numeric Content-Length, and a Transfer-Encoding not ending in chunked.
2. Limits: request line length (414), head size and header count (431).
3. Version: 1.0 or 1.1 (505 otherwise). Target: origin-form, or
   absolute-form (rewritten to origin-form; its authority wins over Host),
   or `*`; anything else 400.
4. Host: HTTP/1.1 needs exactly one (400 otherwise).
5. Framing: `Transfer-Encoding: chunked` exactly (other codings: 400), whose
   body is re-framed on the way out so what the backend gets is unambiguous;
   or Content-Length; or no body.
6. Hop-by-hop headers (Connection, the names it lists, Keep-Alive, TE,
   Trailer, Transfer-Encoding, Upgrade, Proxy-Connection) are removed; an
   Upgrade request keeps Upgrade and gets `Connection: upgrade`. Connection
   cannot name Host or Content-Length: the head would no longer say where
   its body ends (a body smuggled past the proxy as a second request).
7. The listener's rules: headers to remove and to set, then the forwarded
   block (X-Forwarded-For appended to, all its lines joined; X-Forwarded-Proto
   and -Host replaced; X-Request-ID kept, or generated when absent).

Only the header names the rules need are looked for, with one regex over the
lowered head (HeadRules.names), so a typical browser request costs a few C
scans and one join, whatever its other headers are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
# Connection tokens that are not header names to remove, or that name headers
# a message cannot lose (its framing, its Host).
_KEPT_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade", b"host", b"content-length"))
_ALWAYS = HOP_BY_HOP + (b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                        b"x-request-id")
NO_BODY, LENGTH, CHUNKED = 0, 1, 2


class HeadError(Exception):
    """A request that gets an error response and a closed connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HeadRules:
    """What a listener does to request heads; built once per table load."""

    max_request_line: int
    max_head: int
    max_headers: int
    remove: tuple[bytes, ...]  # lowercase names
    add: bytes  # precomputed "Name: value\r\n" lines
    add_names: tuple[bytes, ...]  # lowercase names of `add` (they replace the client's)
    forwarded: bool
    proto: bytes  # b"http" or b"https"
    extra_names: tuple[bytes, ...] = ()  # names routes or hash keys read
    names: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    drop: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        wanted = dict.fromkeys(_ALWAYS + self.remove + self.add_names + self.extra_names)
        pattern = rb"\r\n(" + b"|".join(re.escape(n) for n in sorted(wanted, key=len, reverse=True)) + rb"):"
        object.__setattr__(self, "names", re.compile(pattern))
        drop = set(HOP_BY_HOP) | set(self.remove) | set(self.add_names)
        if self.forwarded:
            drop |= {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"}
        object.__setattr__(self, "drop", frozenset(drop))


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes  # origin-form: path and query
    path: bytes
    host: bytes  # lowercase, without port
    version: bytes  # b"1.1" or b"1.0"
    framing: int  # NO_BODY, LENGTH, CHUNKED
    length: int  # for LENGTH
    keep_alive: bool  # the client wants the connection kept
    upgrade: bool
    head: bytes  # what goes to the backend
    request_id: bytes
    low: bytes  # the lowered original head, for rule lookups (match headers, hash keys)
    raw: bytes  # the original head

    def header(self, name: bytes) -> bytes | None:
        """First value of a header by lowercase name, from the original head."""
        return header_value(self.raw, self.low, name)


def header_value(raw: bytes, low: bytes, name: bytes) -> bytes | None:
    i = low.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + 3 + len(name)
    end = raw.find(b"\r\n", start)
    return raw[start:end].strip(b" \t")


def _lines_with(low: bytes, name: bytes) -> list[tuple[int, int]]:
    """Spans (start, end) of each header line with this name, each span
    starting at its line's leading CRLF."""
    spans = []
    needle = b"\r\n" + name + b":"
    i = low.find(needle)
    while i >= 0:
        end = low.find(b"\r\n", i + 2)
        spans.append((i, end))
        i = low.find(needle, end)
    return spans


def parse_request_head(raw: bytes, method: bytes, url: bytes, version: bytes, rules: HeadRules,
                       client_ip: bytes, new_id: bytes) -> Request:
    """Check and lower one request head. `raw` ends with CRLFCRLF; method,
    url and version come from llhttp, which accepted the head already."""
    line_end = raw.find(b"\r\n")
    if line_end > rules.max_request_line:
        raise HeadError(414, "request line too long")
    if len(raw) > rules.max_head:
        raise HeadError(431, "request head too large")
    if version != b"1.1" and version != b"1.0":
        raise HeadError(505, "HTTP version not supported")
    low = raw.lower()
    if low.count(b"\r\n") - 2 > rules.max_headers:
        raise HeadError(431, "too many header fields")

    # name -> [(start, end)] of each line with that name
    found: dict[bytes, list[tuple[int, int]]] = {}
    for m in rules.names.finditer(low):
        found.setdefault(m.group(1), []).append((m.start(), low.find(b"\r\n", m.end())))

    def value(name: bytes) -> bytes | None:
        spans = found.get(name)
        if spans is None:
            return None
        start, end = spans[0]
        return raw[start + 3 + len(name) : end].strip(b" \t")

    def joined(name: bytes) -> bytes | None:
        """All lines of a list-valued header, as one value (RFC 9110 5.3)."""
        spans = found.get(name)
        if spans is None:
            return None
        return b", ".join(raw[start + 3 + len(name) : end].strip(b" \t") for start, end in spans)

    target, path, authority = _target(url)
    hosts = found.get(b"host", ())
    if len(hosts) > 1:
        raise HeadError(400, "more than one Host header")
    host_value = value(b"host") or b""
    if not hosts and version == b"1.1" and authority is None:
        raise HeadError(400, "missing Host header")
    if authority is not None:
        host_value = authority  # RFC 9112 3.2.2: the target's authority wins
    host = _host_without_port(host_value.lower())

    te = value(b"transfer-encoding")
    if te is not None:
        if te.lower() != b"chunked":
            raise HeadError(400, "unsupported Transfer-Encoding")
        framing, length = CHUNKED, 0
    else:
        cl = value(b"content-length")  # llhttp allows one, all digits
        length = int(cl) if cl is not None else 0
        framing = LENGTH if length else NO_BODY

    connection = value(b"connection")
    tokens = _tokens(connection.lower()) if connection is not None else ()
    keep_alive = (b"close" not in tokens) if version == b"1.1" else (b"keep-alive" in tokens)
    upgrade = b"upgrade" in tokens and b"upgrade" in found

    drop = rules.drop
    if tokens:
        drop = drop | {t for t in tokens if t not in _KEPT_TOKENS}
    if upgrade:
        drop = drop - {b"upgrade"}
    spans = [span for name in drop for span in found.get(name, ())]
    for name in drop.difference(found).difference(_ALWAYS, rules.remove, rules.add_names, rules.extra_names):
        spans += _lines_with(low, name)  # names only Connection listed

    extra = [rules.add]
    request_id = None
    if rules.forwarded:
        xff = joined(b"x-forwarded-for")
        extra.append(b"X-Forwarded-For: " + (xff + b", " + client_ip if xff is not None else client_ip) + b"\r\n")
        extra.append(b"X-Forwarded-Proto: " + rules.proto + b"\r\n")
        if host_value:
            extra.append(b"X-Forwarded-Host: " + host_value + b"\r\n")
        request_id = value(b"x-request-id") if b"x-request-id" not in drop else None
        if not request_id:
            if request_id is not None:
                spans += found[b"x-request-id"]  # an empty one is replaced
            request_id = new_id
            extra.append(b"X-Request-ID: " + new_id + b"\r\n")
    if framing == CHUNKED:
        extra.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade:
        extra.append(b"Connection: upgrade\r\n")
    if authority is not None:
        spans += hosts
        extra.append(b"Host: " + host_value + b"\r\n")

    # Request line (origin-form, the client's version), kept lines, added lines.
    first = method + b" " + target + b" HTTP/" + version
    if spans:
        spans.sort()
        parts = [first]
        pos = line_end
        for start, end in spans:
            if start >= pos:
                parts.append(raw[pos:start])
                pos = end
        parts.append(raw[pos : len(raw) - 2])  # ends with the last kept line's CRLF
        head = b"".join(parts) + b"".join(extra) + b"\r\n"
    else:
        head = first + raw[line_end : len(raw) - 2] + b"".join(extra) + b"\r\n"
    return Request(method, target, path, host, version, framing, length, keep_alive, upgrade, head,
                   request_id or b"", low, raw)


def _target(url: bytes) -> tuple[bytes, bytes, bytes | None]:
    """(origin-form target, path, authority of an absolute-form target)."""
    if url[:1] == b"/":
        q = url.find(b"?")
        return url, (url if q < 0 else url[:q]), None
    lowered = url[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        rest = url[url.find(b"//") + 2 :]
        slash = rest.find(b"/")
        authority, target = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        if b"@" in authority or not authority:
            raise HeadError(400, "bad absolute-form target")
        q = target.find(b"?")
        return target, (target if q < 0 else target[:q]), authority
    if url == b"*":
        return url, url, None
    raise HeadError(400, "bad request target")


def _host_without_port(host: bytes) -> bytes:
    """The name routes match: no port, no trailing dot (as compiled routes)."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(b":")
    return (host[:colon] if colon >= 0 else host).rstrip(b".")


def _tokens(value: bytes) -> tuple[bytes, ...]:
    return tuple(t.strip(b" \t") for t in value.split(b",") if t.strip(b" \t"))


# -- responses -------------------------------------------------------------------

_RESPONSE_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade")
_RESPONSE_KEPT_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding"))


def lower_response_head(raw: bytes, add: bytes, upgrade: bool, connection: bytes | None) -> bytes:
    """The head to send to the client: hop-by-hop headers removed (but the
    upgrade pair of a 101), the listener's response headers set, and a
    Connection header when the client needs one (`close` when the connection
    ends after this response, `keep-alive` for an HTTP/1.0 client that keeps
    it). Transfer-Encoding is kept: the body is passed through as framed,
    and the backend saw the client's HTTP version, so it framed for it; for
    the same reason a Connection header cannot remove it or Content-Length."""
    low = raw.lower()
    spans: list[tuple[int, int]] = []
    listed = header_value(raw, low, b"connection")
    names = set(_RESPONSE_HOP)
    if listed is not None:
        names.update(t for t in _tokens(listed.lower()) if t not in _RESPONSE_KEPT_TOKENS)
    if upgrade:
        names.discard(b"upgrade")
        names.discard(b"connection")
    for name in names:
        if b"\r\n" + name + b":" in low:
            spans += _lines_with(low, name)
    if add:
        for line in add.split(b"\r\n"):
            if line:
                name = line.split(b":", 1)[0].lower()
                if b"\r\n" + name + b":" in low:
                    spans += _lines_with(low, name)
    if not spans and not add and connection is None:
        return raw
    spans.sort()
    parts = []
    pos = 0
    for start, end in spans:
        if start >= pos:
            parts.append(raw[pos:start])
            pos = end
    parts.append(raw[pos : len(raw) - 2])
    if connection is not None:
        parts.append(b"Connection: " + connection + b"\r\n")
    parts.append(add)
    parts.append(b"\r\n")
    return b"".join(parts)


_REASONS = {
    400: b"Bad Request", 404: b"Not Found", 505: b"HTTP Version Not Supported", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


def error_response(status: int, close: bool, request_id: bytes = b"") -> bytes:
    reason = _REASONS.get(status, b"Error")
    body = b"%d %s\n" % (status, reason)
    rid = b"X-Request-ID: " + request_id + b"\r\n" if request_id else b""
    conn = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nCache-Control: no-store\r\n%s%s\r\n%s"
            % (status, reason, len(body), rid, conn, body))

"""HTTP/1.1 message heads, without I/O: raw head bytes in, a decision out.

The proxy forwards request and response heads as raw bytes instead of
re-serializing every header, so it must be sure the bytes are unambiguous
before it passes them on. Rules, in the order they apply to a request head
(everything up to and including the blank line):

1. llhttp (httptools, no lenient flags) has accepted the head before it gets here,
   which is the C-speed gate: it rejects bare CR or LF line endings, NUL and
   other control bytes, obs-fold, spaces before a colon, invalid methods and
   targets, Content-Length together with Transfer-Encoding, repeated or
   non-numeric Content-Length, and a Transfer-Encoding not ending in chunked.
2. Limits: request line length (414), head size and header count (431).
3. Version: 1.0 or 1.1 (505 otherwise). Target: origin-form, or
   absolute-form (rewritten to origin-form; its authority wins over Host),
   or `*` for OPTIONS; anything else 400.
4. Host: HTTP/1.1 needs exactly one, and its value must be a URI host with
   an optional port (400 otherwise: RFC 9112 3.2).
5. Framing: `Transfer-Encoding: chunked` exactly (other codings: 400), whose
   body is re-framed on the way out so what the backend gets is unambiguous;
   or Content-Length; or no body. An HTTP/1.0 request with
   Transfer-Encoding is refused (RFC 9112 6.1: its framing is faulty).
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
from collections.abc import Callable
from dataclasses import dataclass, field

HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
# Connection tokens that are not header names to remove, or that name headers
# a message cannot lose (its framing, its Host).
_KEPT_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade", b"host", b"content-length"))
_ALWAYS = HOP_BY_HOP + (b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                        b"x-request-id")
NO_BODY, LENGTH, CHUNKED = 0, 1, 2
# RFC 3986 host (IP-literal, or reg-name / IPv4: unreserved, pct-encoded,
# sub-delims) with an optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")


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
    names: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    special: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    drop: frozenset[bytes] = field(init=False, repr=False, compare=False)
    proto_line: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names_pattern(_ALWAYS + self.remove + self.add_names))
        # Any of these in a head means the general path (the fast one knows Host and X-Request-ID only).
        special = tuple(n for n in _ALWAYS + self.remove + self.add_names if n not in (b"host", b"x-request-id"))
        object.__setattr__(self, "special", _names_pattern(special))
        drop = set(HOP_BY_HOP) | set(self.remove) | set(self.add_names)
        if self.forwarded:
            drop |= {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"}
        object.__setattr__(self, "drop", frozenset(drop))
        object.__setattr__(self, "proto_line", b"X-Forwarded-Proto: " + self.proto + b"\r\n")


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


def header_values(raw: bytes, low: bytes, name: bytes) -> bytes:
    """Every line of a header by lowercase name, joined with "; " (for
    Cookie, which clients may split over several lines)."""
    return b"; ".join(raw[start + 3 + len(name) : end].strip(b" \t") for start, end in _lines_with(low, name))


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


def _names_pattern(names: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """`\r\n(name|...):` over a lowered head; longest names first."""
    ordered = sorted(dict.fromkeys(names), key=len, reverse=True)
    return re.compile(rb"\r\n(" + b"|".join(re.escape(n) for n in ordered) + rb"):")


def _header_lines(low: bytes, names: re.Pattern[bytes]) -> dict[bytes, list[tuple[int, int]]]:
    """name -> [(start, end)] of each line of a lowered head with one of
    `names`; each span starts at the line's leading CRLF."""
    found: dict[bytes, list[tuple[int, int]]] = {}
    for m in names.finditer(low):
        name = m.group(1)
        span = (m.start(), low.find(b"\r\n", m.end()))
        if name in found:
            found[name].append(span)
        else:
            found[name] = [span]
    return found


def _value(raw: bytes, found: dict[bytes, list[tuple[int, int]]], name: bytes) -> bytes | None:
    spans = found.get(name)
    if spans is None:
        return None
    start, end = spans[0]
    return raw[start + 3 + len(name) : end].strip(b" \t")


def parse_request_head(raw: bytes, method: bytes, url: bytes, version: bytes, rules: HeadRules,
                       client_ip: bytes, new_id: Callable[[], bytes], conn_headers: bytes = b"") -> Request:
    """Check and lower one request head. `raw` ends with CRLFCRLF; method,
    url and version come from llhttp, which accepted the head already.
    `conn_headers` are lines this connection adds to each of its requests
    (the verified client certificate subject of an mTLS connection).
    (Written for the common case: a few dict lookups when the head holds
    none of the headers the rules act on.)"""
    if raw[0] == 13 or raw[0] == 10:
        # A CR or LF left before the request line (whole CRLF pairs are
        # skipped before this): llhttp skips it, the line offsets here would
        # not, and the request line would be forwarded as a header line.
        raise HeadError(400, "bad line ending")
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
    if url[:1] == b"/" and line_end == len(method) + len(url) + 10 and rules.special.search(low) is None:
        fast = _plain_request(raw, low, method, url, version, rules, client_ip, new_id, conn_headers)
        if fast is not None:
            return fast
    return _general_request(raw, low, line_end, method, url, version, rules, client_ip, new_id, conn_headers)


def _general_request(raw: bytes, low: bytes, line_end: int, method: bytes, url: bytes, version: bytes,
                     rules: HeadRules, client_ip: bytes, new_id: Callable[[], bytes],
                     conn_headers: bytes = b"") -> Request:
    """Any head llhttp accepted, within the limits: the rules applied in full."""
    found = _header_lines(low, rules.names)

    if url[:1] == b"/":  # origin-form, the common case
        q = url.find(b"?")
        target, path, authority = url, (url if q < 0 else url[:q]), None
    else:
        target, path, authority = _target(url, method)
    hosts = found.get(b"host", ())
    if len(hosts) > 1:
        raise HeadError(400, "more than one Host header")
    if authority is not None:
        host_value = authority  # RFC 9112 3.2.2: the target's authority wins
    elif hosts:
        host_value = raw[hosts[0][0] + 7 : hosts[0][1]].strip(b" \t")
    elif version == b"1.1":
        raise HeadError(400, "missing Host header")
    else:
        host_value = b""
    if _HOST.fullmatch(host_value) is None:
        raise HeadError(400, "bad Host header")
    host = host_value.lower()
    colon = host.rfind(b":")
    if colon > 0 and host[0] != 91 and host[colon - 1] != 46:  # name:port (91 "[", 46 ".")
        host = host[:colon]
    elif colon >= 0 or host[-1:] == b".":
        host = _host_without_port(host)

    framing, length = NO_BODY, 0
    if b"transfer-encoding" in found:
        if _value(raw, found, b"transfer-encoding").lower() != b"chunked":
            raise HeadError(400, "unsupported Transfer-Encoding")
        if version != b"1.1":
            raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        framing = CHUNKED
    elif b"content-length" in found:
        length = int(_value(raw, found, b"content-length"))  # llhttp allows one, all digits
        if length:
            framing = LENGTH

    drop = rules.drop
    if b"connection" in found:
        tokens = _tokens(_value(raw, found, b"connection").lower())
        keep_alive = (b"close" not in tokens) if version == b"1.1" else (b"keep-alive" in tokens)
        upgrade = b"upgrade" in tokens and b"upgrade" in found
        listed = {t for t in tokens if t not in _KEPT_TOKENS}
        if listed:
            drop = drop | listed
        if upgrade:
            drop = drop - {b"upgrade"}
    else:
        listed = ()
        keep_alive, upgrade = version == b"1.1", False
    spans = [] if drop.isdisjoint(found) else [span for name, ls in found.items() if name in drop for span in ls]
    for name in listed:
        if name not in found:
            spans += _lines_with(low, name)  # names only Connection listed

    extra = [rules.add] if rules.add else []
    if conn_headers:
        extra.append(conn_headers)
    request_id = b""
    if rules.forwarded:
        if b"x-forwarded-for" in found:
            xff = b", ".join(raw[start + 18 : end].strip(b" \t") for start, end in found[b"x-forwarded-for"])
            extra.append(b"X-Forwarded-For: " + xff + b", " + client_ip + b"\r\n")
        else:
            extra.append(b"X-Forwarded-For: " + client_ip + b"\r\n")
        extra.append(rules.proto_line)
        if host_value:
            extra.append(b"X-Forwarded-Host: " + host_value + b"\r\n")
        if b"x-request-id" in found and b"x-request-id" not in drop:
            start, end = found[b"x-request-id"][0]
            request_id = raw[start + 15 : end].strip(b" \t")
            if not request_id:
                spans += found[b"x-request-id"]  # an empty one is replaced
        if not request_id:
            request_id = new_id()
            extra.append(b"X-Request-ID: " + request_id + b"\r\n")
    if framing == CHUNKED:
        extra.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade:
        extra.append(b"Connection: upgrade\r\n")
    if authority is not None:
        spans += hosts
        extra.append(b"Host: " + host_value + b"\r\n")
    extra.append(b"\r\n")
    # The request line as llhttp read it, unless it needs rewriting (absolute
    # form, or extra spaces llhttp tolerates: those do not reach the backend).
    as_read = authority is None and line_end == len(method) + len(url) + 10
    if as_read and not spans:
        head = b"".join([raw[: len(raw) - 2], *extra])
    else:
        parts = [raw[:line_end] if as_read else method + b" " + target + b" HTTP/" + version]
        pos = line_end
        for start, end in sorted(spans):
            if start >= pos:
                parts.append(raw[pos:start])
                pos = end
        parts.append(raw[pos : len(raw) - 2])  # ends with the last kept line's CRLF
        parts += extra
        head = b"".join(parts)
    return Request(method, target, path, host, version, framing, length, keep_alive, upgrade, head,
                   request_id, low, raw)


def _plain_request(raw: bytes, low: bytes, method: bytes, url: bytes, version: bytes, rules: HeadRules,
                   client_ip: bytes, new_id: Callable[[], bytes], conn_headers: bytes = b"") -> Request | None:
    """The common case, without building a table of the head's headers: an
    origin-form target on a canonical request line, and no header the rules
    act on but Host and X-Request-ID (checked by the caller). The result is
    what the general path gives; None sends the head there instead."""
    h = low.find(b"\r\nhost:")
    if h < 0 or low.find(b"\r\nhost:", h + 7) >= 0:
        return None  # no Host, or two: the general path says which error
    end = low.find(b"\r\n", h + 7)
    host_value = raw[h + 7 : end].strip(b" \t")
    if _HOST.fullmatch(host_value) is None:
        return None
    host = low[h + 7 : end].strip(b" \t")
    colon = host.rfind(b":")
    if colon > 0 and host[0] != 91 and host[colon - 1] != 46:  # name:port (91 "[", 46 ".")
        host = host[:colon]
    elif colon >= 0 or host[-1:] == b".":
        host = _host_without_port(host)
    q = url.find(b"?")
    parts = [raw[: len(raw) - 2]]
    if rules.add:
        parts.append(rules.add)
    if conn_headers:
        parts.append(conn_headers)
    request_id = b""
    if rules.forwarded:
        parts += (b"X-Forwarded-For: ", client_ip, b"\r\n", rules.proto_line)
        if host_value:
            parts += (b"X-Forwarded-Host: ", host_value, b"\r\n")
        r = low.find(b"\r\nx-request-id:")
        if r >= 0:
            request_id = raw[r + 15 : low.find(b"\r\n", r + 15)].strip(b" \t")
        if not request_id:
            if r >= 0:
                return None  # an empty one is replaced: the general path removes it
            request_id = new_id()
            parts += (b"X-Request-ID: ", request_id, b"\r\n")
    parts.append(b"\r\n")
    return Request(method, url, url if q < 0 else url[:q], host, version, NO_BODY, 0, version == b"1.1", False,
                   b"".join(parts), request_id, low, raw)


def _target(url: bytes, method: bytes) -> tuple[bytes, bytes, bytes | None]:
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
    if url == b"*" and method == b"OPTIONS":
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

CLOSE_DELIMITED = 3  # response framing: the body runs until the backend closes
_RESPONSE_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade")
_RESPONSE_KEPT_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding"))


@dataclass(frozen=True, slots=True)
class ResponseRules:
    """What a listener does to response heads; built once per table load."""

    add: bytes  # precomputed "Name: value\r\n" lines (they replace the backend's)
    add_names: tuple[bytes, ...]  # lowercase
    names: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    special: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    drop: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names_pattern(
            _RESPONSE_HOP + (b"content-length", b"transfer-encoding") + self.add_names))
        # Any of these in a head means parse_response_head (plain_response_length knows the others).
        special = tuple(n for n in _RESPONSE_HOP + (b"transfer-encoding",) + self.add_names if n != b"connection")
        object.__setattr__(self, "special", _names_pattern(special))
        object.__setattr__(self, "drop", frozenset(_RESPONSE_HOP + self.add_names))


@dataclass(slots=True)
class Response:
    status: int
    framing: int  # NO_BODY, LENGTH, CHUNKED or CLOSE_DELIMITED
    length: int  # for LENGTH
    keep_alive: bool  # the backend's connection may carry another request
    upgrade: bool  # a 101 to an upgrade request: the connection becomes a tunnel
    raw: bytes
    found: dict[bytes, list[tuple[int, int]]]  # header name -> line spans, for lower_response
    listed: tuple[bytes, ...]  # other header names the backend's Connection header lists
    connection: bytes  # the backend's Connection value, lowercase (b"" without one)


def plain_response_length(raw: bytes, method: bytes, rules: ResponseRules) -> int:
    """The body length of the common response that goes to a kept-alive
    client unchanged: HTTP/1.1, a status with a body (not 1xx, 204, 304; not
    to HEAD), exactly one Content-Length, no hop-by-hop header but at most one
    `Connection: keep-alive` (lbc's own option then, see lower_response), and
    no response headers to add on the listener. -1 for any other:
    parse_response_head decides those."""
    if rules.add or raw[:9] != b"HTTP/1.1 " or method == b"HEAD" or raw[9:10] == b"1" or raw[9:12] in (b"204", b"304"):
        return -1
    low = raw.lower()
    if rules.special.search(low) is not None:
        return -1
    c = low.find(b"\r\nconnection:")
    if c >= 0:
        e = low.find(b"\r\n", c + 13)
        if low[c + 13 : e].strip(b" \t") != b"keep-alive" or low.find(b"\r\nconnection:", e) >= 0:
            return -1
    i = low.find(b"\r\ncontent-length:")
    if i < 0:
        return -1
    e = low.find(b"\r\n", i + 17)
    value = raw[i + 17 : e].strip(b" \t")
    if not value.isdigit() or low.find(b"\r\ncontent-length:", e) >= 0 or not raw[9:12].isdigit():
        return -1
    return int(value)


def parse_response_head(raw: bytes, method: bytes, upgrade_requested: bool, rules: ResponseRules) -> Response:
    """Framing and reuse of a final (not 1xx) response head. A head lbc
    cannot frame unambiguously is a broken backend: HeadError(502)."""
    if raw[:7] != b"HTTP/1." or raw[8:9] != b" " or not raw[9:12].isdigit() or raw[12:13] not in (b" ", b"\r"):
        raise HeadError(502, "bad status line from the backend")
    status = int(raw[9:12])
    low = raw.lower()
    found = _header_lines(low, rules.names)
    keep_alive = raw[7:8] == b"1"
    listed: tuple[bytes, ...] = ()
    connection = b""
    if b"connection" in found:
        start, end = found[b"connection"][0]
        connection = low[start + 13 : end].strip(b" \t")
        if connection == b"keep-alive" or connection == b"close":  # the common values, without a split
            tokens: tuple[bytes, ...] = (connection,)
        else:
            tokens = _tokens(connection)
            listed = tuple(t for t in tokens if t not in _RESPONSE_KEPT_TOKENS)
        keep_alive = b"keep-alive" in tokens if raw[7:8] == b"0" else b"close" not in tokens
    upgrade = status == 101 and upgrade_requested
    length = 0
    if upgrade or method == b"HEAD" or status in (204, 304):
        framing = NO_BODY
    elif b"transfer-encoding" in found:
        chunked = _value(raw, found, b"transfer-encoding").lower().endswith(b"chunked")
        framing = CHUNKED if chunked else CLOSE_DELIMITED
    elif b"content-length" in found:
        lines = found[b"content-length"]
        if len(lines) == 1:
            value = raw[lines[0][0] + 17 : lines[0][1]].strip(b" \t")
        else:  # the same length repeated is one length; different ones are not
            values = {raw[start + 17 : end].strip(b" \t") for start, end in lines}
            value = values.pop() if len(values) == 1 else b""
        if not value.isdigit():
            raise HeadError(502, "bad Content-Length from the backend")
        length = int(value)
        framing = LENGTH if length else NO_BODY
    else:
        framing = CLOSE_DELIMITED
    if framing == CLOSE_DELIMITED:
        keep_alive = False
    return Response(status, framing, length, keep_alive, upgrade, raw, found, listed, connection)


def lower_response(resp: Response, rules: ResponseRules, connection: bytes | None, extra: bytes = b"") -> bytes:
    """The head to send to the client: hop-by-hop headers removed (but the
    upgrade pair of a 101), the listener's response headers set, and a
    Connection header when the client needs one (`close` when the connection
    ends after this response, `keep-alive` for an HTTP/1.0 client that keeps
    it). Transfer-Encoding is kept: the body is passed through as framed,
    and the backend saw the client's HTTP version, so it framed for it; for
    the same reason a Connection header cannot remove it or Content-Length.

    When lbc keeps the client connection open (`connection` None) and the
    backend's only hop-by-hop header is one `Connection: keep-alive`, the head
    goes out as it came: that line is then exactly lbc's own control option,
    which RFC 9110 7.6.1 lets an intermediary send in its place.

    `extra`: lines this response alone gets (a stickiness Set-Cookie)."""
    raw, found = resp.raw, resp.found
    drop = rules.drop
    if connection is None and not rules.add and not resp.upgrade and not resp.listed and not extra:
        hop = [name for name in found if name in drop]
        if not hop or (hop == [b"connection"] and resp.connection == b"keep-alive"
                       and len(found[b"connection"]) == 1 and raw[7:8] == b"1"):
            return raw
    if resp.listed:
        drop = drop.union(resp.listed)
    if resp.upgrade:
        drop = drop - {b"upgrade", b"connection"}
    spans = [span for name, lines in found.items() if name in drop for span in lines]
    for name in resp.listed:
        if name not in found:
            spans += _lines_with(raw.lower(), name)  # names only Connection listed
    if not spans and not rules.add and connection is None and not extra:
        return raw
    parts = []
    pos = 0
    for start, end in sorted(spans):
        if start >= pos:
            parts.append(raw[pos:start])
            pos = end
    parts.append(raw[pos : len(raw) - 2])
    if connection is not None:
        parts.append(b"Connection: " + connection + b"\r\n")
    parts.append(rules.add)
    parts.append(extra)
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

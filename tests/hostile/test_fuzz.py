"""Scorecard row "fuzz": property-based fuzzing (hypothesis) of what a
hostile client or a hostile config file reaches first.

1. The request path, pure: generated heads (realistic pieces mixed with
   hostile ones, mutations of valid heads, random bytes) go through the steps
   HttpClient._head/_start take (cut at CRLFCRLF, llhttp, h1.parse_request_head
   with a compiled listener's HeadRules, routing), and chunked bodies through
   ChunkedDecoder. Only the parser's own errors may come out; a refusal is a
   4xx/5xx; an accepted head is forwarded as a head h11 parses strictly, with
   no CR/LF/NUL or obs-fold in any line and with the framing lbc decided, so
   what a backend gets is never ambiguous; re-framed chunked output re-parses
   with the payload a reference decoder finds.
2. The same generated requests, completed as lbc will read them, against a
   live node over raw sockets: each gets a response (or a clean close) within
   seconds, and no worker dies.
3. The config path (`lbc validate`/`compile`: load -> check -> compile):
   mutated example and case files, config-shaped trees, random YAML and bytes,
   deep nesting, huge numbers, alias bombs: a table or an LbcError with a
   message, never another exception, bounded in time and memory.

`make test` runs a few hundred derandomized examples per property (CI is
repeatable); `--scorecard` runs tens of thousands, randomly. LBC_FUZZ_SCALE
(a factor, e.g. 0.1) scales the counts of either mode.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import socket
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import h11
import httptools
import pytest
from conftest import CASES, EXAMPLE, ROOT
from hostile.lb import HTTP_PORT, config, web_origins
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from lbc_workers.proxy import h1
from lbc_workers.proxy.chunked import MAX_SIZE_LINE, MAX_TRAILERS, ChunkedDecoder, ChunkError
from lbc_workers.proxy.http import _VERSIONS, _HeadParse
from lbc_workers.proxy.router import Router
from ruamel.yaml import YAML
from support.node import get

from lbc import service
from lbc.config import check_document
from lbc.config.loader import parse_bytes
from lbc.errors import LbcError
from lbc.state import slot_key

pytestmark = [pytest.mark.row("fuzz"), pytest.mark.timeout(1800)]  # --scorecard: about 4 min here

# Examples per property: (make test, --scorecard).
PURE = (1_000, 20_000)
LIVE_BATCHES = (30, 500)  # batches of LIVE_BATCH concurrent requests
LIVE_BATCH = 10
CONFIG = (500, 5_000)
MEMORY_LIMIT = 200 * 1024 * 1024


def _count(request: pytest.FixtureRequest, counts: tuple[int, int]) -> int:
    long = request.config.getoption("--scorecard")
    return max(1, int(counts[long] * float(os.environ.get("LBC_FUZZ_SCALE", "1"))))


def _settings(request: pytest.FixtureRequest, n: int, deadline: timedelta | None) -> settings:
    long = request.config.getoption("--scorecard")
    return settings(max_examples=n, deadline=deadline, derandomize=not long, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# -- request heads: generation ------------------------------------------------------------------

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token = st.text(_TCHAR, min_size=1, max_size=12).map(str.encode)
junk = st.binary(max_size=24)
# Bytes a parser has to get right: line ends, NUL, separators, obs-text.
nasty = st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x7f", b"\xff", b"\x0b"])

plain_methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
methods = st.one_of(
    st.sampled_from([b"CONNECT", b"TRACE", b"PRI", b"PROPFIND", b"get", b"GE T", b"G\x00ET", b""]),
    token, junk,
)
plain_targets = st.sampled_from([b"/", b"/echo", b"/echo?a=b&c=%20", b"/api/x", b"/v1/y", b"/img/a.png",
                                 b"http://api.example.test/echo", b"*"])
targets = st.one_of(
    st.sampled_from([
        b"*", b"http://example.test/echo", b"https://api.example.test:8443/x?y", b"HTTP://EXAMPLE.TEST",
        b"http://user@example.test/", b"http:///x", b"http://[::1]:80/", b"http://example.test.:80/",
        b"//evil.test/x", b"/a b", b"/%00", b"example.test:443", b"/\xff", b"/a\tb", b"", b"?", b"#frag",
        b"/" + b"a" * 9000,
    ]),
    st.text(min_size=1, max_size=30).map(lambda t: b"/" + t.encode()), junk,
)
versions = st.one_of(st.just(b"HTTP/1.1"), st.just(b"HTTP/1.0"), st.sampled_from(
    [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1", b"HTTP/11", b"HTTPS/1.1", b""]))
spaces = st.one_of(st.just(b" "), st.sampled_from([b"  ", b"\t", b"", b"\x00", b"\r"]))
line_ends = st.one_of(st.just(b"\r\n"), st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\r\n ", b"\n\r"]))
names = st.one_of(
    st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Keep-Alive",
                     b"TE", b"Trailer", b"Proxy-Connection", b"X-Forwarded-For", b"X-Forwarded-Host",
                     b"X-Forwarded-Proto", b"X-Request-ID", b"X-Secret", b"X-Added", b"Cookie", b"Expect",
                     b"X-Canary"]),
    st.sampled_from([b"host", b"CONTENT-LENGTH", b"transfer-encoding", b"Content-Length ", b" Host",
                     b"Transfer_Encoding", b"Host\x00", b"", b"X\rY", b"Content-Length\t"]),
    token, junk,
)
values = st.one_of(
    st.sampled_from([b"example.test", b"api.example.test:8080", b"[::1]:8080", b"EXAMPLE.TEST.", b"a.example.test",
                     b"0", b"5", b"-1", b"+5", b"05", b"5, 5", b"5,6", b"1" * 25, b"0x10", b" 5 ", b"18446744073709551616"]),
    st.sampled_from([b"chunked", b"Chunked", b" chunked ", b"gzip, chunked", b"chunked, gzip", b"chunked, chunked",
                     b"identity", b"chunked;q=1", b"close", b"keep-alive", b"Upgrade", b"keep-alive, Upgrade",
                     b"close, x-secret, host", b"content-length", b"te, trailer, x-canary", b"websocket",
                     b"100-continue", b"yes", b"", b" ", b"1.2.3.4, 5.6.7.8"]),
    st.sampled_from([b"a\x00b", b"a\rb", b"a\nb", b"a\x7fb", b"\xff\xfe", b"a\r\n b", b"a\r\n\tb", b"a\r\nX: y"]),
    st.integers(0, 20_000).map(lambda n: b"v" * n),
    token, junk,
)
separators = st.one_of(st.just(b": "), st.sampled_from([b":", b" : ", b":\t", b" :", b"::", b"", b": \x00"]))
# Whole lines of a well-formed request, so that most heads get past llhttp and the rules run.
plain_lines = st.sampled_from([
    b"Host: example.test\r\n", b"Host: api.example.test\r\n", b"Connection: keep-alive\r\n", b"Connection: close\r\n",
    b"Connection: Upgrade\r\n", b"Upgrade: websocket\r\n", b"User-Agent: fuzz/1\r\n", b"Accept: */*\r\n",
    b"X-Forwarded-For: 10.0.0.1\r\n", b"X-Request-ID: abc\r\n", b"X-Request-ID:\r\n", b"Cookie: a=b\r\n",
    b"X-Secret: s\r\n", b"X-Canary: yes\r\n", b"Keep-Alive: timeout=5\r\n", b"Connection: x-canary\r\n",
])
framing_lines = st.sampled_from([b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n",
                                 b"Content-Length: 15\r\n"])


@st.composite
def header_lines(draw) -> bytes:
    return draw(names) + draw(separators) + draw(values) + draw(line_ends)


@st.composite
def heads(draw) -> bytes:
    """A request head built from pieces, then maybe some body bytes. A few
    of its parts (often none) get hostile values, the others plain ones, so
    that many heads get past llhttp and the rules behind it run too."""
    hostile = draw(st.sets(st.sampled_from(["lead", "method", "target", "version", "spaces", "eol", "fields",
                                            "framing", "many", "end"]), max_size=3))

    def part(name: str, plain, other):
        return draw(other if name in hostile else plain)

    lead = part("lead", st.just(b""), st.sampled_from([b"\r\n", b"\r\n\r\n", b"\n", b" ", b"\r", b"\r\r\n", b"\n\r\n"]))
    sp = st.just(b" ")
    eol = st.just(b"\r\n")
    line = (part("method", plain_methods, methods) + part("spaces", sp, spaces) + part("target", plain_targets, targets)
            + part("spaces", sp, spaces) + part("version", st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), versions)
            + part("eol", eol, line_ends))
    lines = draw(st.lists(plain_lines, max_size=8))
    # One framing header at most, or (hostile) several: repeated, conflicting, CL with TE.
    for framing in draw(st.lists(framing_lines, min_size=2, max_size=3) if "framing" in hostile
                        else st.lists(framing_lines, max_size=1)):
        lines.insert(draw(st.integers(0, len(lines))), framing)
    if "fields" in hostile:
        for _ in range(draw(st.integers(1, 4))):
            lines.insert(draw(st.integers(0, len(lines))), draw(header_lines()))
    if draw(st.integers(0, 3)) != 3:  # usually a Host
        lines.insert(draw(st.integers(0, len(lines))), b"Host: example.test\r\n")
    many = part("many", st.just(0), st.sampled_from([90, 99, 100, 101, 150]))  # around the default max_header_count
    end = part("end", eol, st.sampled_from([b"\n", b"", b"\r\n\r\n", b"\r"]))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=40), st.just(b"5\r\nhello\r\n0\r\n\r\n")))
    return lead + line + b"".join(lines) + b"X-N: v\r\n" * many + end + body


VALID_HEADS = [
    b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://api.example.test/v1/x?y HTTP/1.1\r\nHost: other\r\nConnection: close, x-secret\r\nX-Secret: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\nX-Request-ID: r1\r\n\r\n",
]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid request with a few byte edits (insert/replace/delete)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.one_of(nasty, junk))
        if op == "insert":
            data[i:i] = piece
        elif op == "replace":
            data[i : i + len(piece)] = piece
        else:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


requests = st.one_of(
    heads(), heads(), mutated(VALID_HEADS),
    st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
)

# -- request heads: the path HttpClient takes -----------------------------------------------------


def pure_router(tmp: Path) -> Router:
    """The Router a worker builds from a compiled config: routes with every
    kind of match, request header rules, the default limits."""
    text = """\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8080
    add_request_headers: {X-Added: "yes"}
    remove_request_headers: [X-Secret]
    routes:
      - {match: {host: api.example.test}, pool: web}
      - {match: {host: "*.example.test", path_prefix: /img/}, pool: web}
      - {match: {path_regex: "/v[0-9]+/"}, pool: web}
      - {match: {method: [POST, PUT]}, pool: web}
      - {match: {headers: {X-Canary: "yes"}}, pool: web}
      - {match: {path_prefix: /api}, pool: web}
pools:
  - name: web
    backends: [{id: web-1, address: 127.0.0.1, port: 9101}]
"""
    path = tmp / "pure.yaml"
    path.write_text(text)
    table = service.compile_file(path).table
    slots = {slot_key(p.name, b): i for i, (p, b) in enumerate((p, b) for p in table.pools for b in p.backends)}
    return Router.build("fuzz", table, slots, None, tmp)


class Refused(Exception):
    """lbc answers `status` and closes (not raised by lbc: the driver's result)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


WAITING = "waiting"  # no whole head yet: lbc waits for more bytes


def through_lbc(data: bytes, listener) -> tuple[h1.Request, bytes, bytes] | str:
    """What HttpClient._head and _start do with `data` as the first bytes
    of a connection: (the request, the bytes after its head, the URL llhttp
    read), WAITING, or Refused(status) raised. Exceptions lbc catches are caught here the same
    way; any other one propagates."""
    rules = listener.rules
    buf = bytearray(data)
    while buf[:2] == b"\r\n":
        del buf[:2]
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        first = buf.find(b"\r\n")
        if (first < 0 and len(buf) > rules.max_request_line) or first > rules.max_request_line:
            raise Refused(414)
        if len(buf) > rules.max_head:
            raise Refused(431)
        crlf = buf.count(b"\r\n")
        if buf and (buf.count(b"\n") != crlf or buf.count(b"\r") - (buf[-1:] == b"\r") != crlf):
            raise Refused(400)
        return WAITING
    raw = bytes(buf[: end + 4])
    cb = _HeadParse()
    parser = httptools.HttpRequestParser(cb)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        raise Refused(400) from None
    method = parser.get_method()
    if method == b"CONNECT":
        raise Refused(400)
    try:
        req = h1.parse_request_head(raw, method, cb.url, _VERSIONS.get(parser.get_http_version(), b"?"),
                                    rules, b"127.0.0.1", lambda: b"fuzz-1")
    except h1.HeadError as e:
        assert 400 <= e.status < 600, (e.status, e.reason)
        raise Refused(e.status) from None
    listener.route(req)  # routing runs on what the client sent: it must not raise either
    return req, bytes(buf[end + 4 :]), cb.url


def framing_of(headers) -> tuple[int, int]:
    """(h1 framing, length) a strict recipient takes from parsed request headers."""
    te = [v for n, v in headers if n == b"transfer-encoding"]
    cl = [v for n, v in headers if n == b"content-length"]
    if te:
        return h1.CHUNKED, 0
    if cl and int(cl[0]):
        return h1.LENGTH, int(cl[0])
    return h1.NO_BODY, 0


def h11_request(head: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event


def check_forwarded(req: h1.Request) -> None:
    """The head lbc sends to the backend is plain, strict HTTP/1.1 with the
    framing lbc decided."""
    head = req.head
    assert head.find(b"\r\n\r\n") == len(head) - 4, head
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line, ("smuggled CR/LF/NUL", line, head)
    fields = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    for line in lines[1:]:
        assert line[:1] not in (b" ", b"\t") and b":" in line, ("obs-fold or not a field", line, head)
    assert fields.count(b"content-length") + fields.count(b"transfer-encoding") <= 1, head
    assert fields.count(b"host") == 1 or (req.version == b"1.0" and fields.count(b"host") == 0), head
    try:
        event = h11_request(head)
    except h11.RemoteProtocolError as e:
        raise AssertionError(f"h11 refuses the forwarded head ({e}): {head!r}") from None
    assert (event.method, event.target, event.http_version) == (req.method, req.target, req.version), head
    assert framing_of(event.headers) == (req.framing, req.length if req.framing == h1.LENGTH else 0), head


def check_request(data: bytes, listener) -> str:
    """One generated request through the parser path; returns the outcome."""
    try:
        got = through_lbc(data, listener)
    except Refused:
        return "refused"
    if got == WAITING:
        return WAITING
    req, rest, url = got
    check_forwarded(req)
    # parse_request_head's fast path (_plain_request) promises what the general path gives.
    general = h1._general_request(req.raw, req.raw.lower(), req.raw.find(b"\r\n"), req.method, url, req.version,
                                  listener.rules, b"127.0.0.1", lambda: b"fuzz-1")
    assert general == req, (req.raw, general.head, req.head)
    # A head both lbc and h11 accept means the same framing to both: no desync
    # between lbc and a backend that would read the original.
    try:
        original = h11_request(req.raw)
    except h11.RemoteProtocolError:
        original = None
    if original is not None:
        assert framing_of(original.headers) == (req.framing, req.length if req.framing == h1.LENGTH else 0), req.raw
    if req.framing == h1.CHUNKED:
        try:
            _, used = ChunkedDecoder().feed(rest)
        except ChunkError:
            return "body refused"
        assert used <= len(rest)
    return "forwarded"


# -- chunked bodies ---------------------------------------------------------------------------------


@st.composite
def chunked_bodies(draw) -> tuple[bytes, bytes]:
    """(a valid chunked encoding, its payload)."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=64), max_size=6))
    ext = st.one_of(st.just(b""), st.sampled_from([b";a=b", b";x", b";", b';q="1 2"', b";" + b"e" * 1000]))
    parts = []
    for c in chunks:
        size = draw(st.sampled_from(["%x", "%X", "000%x"])) % len(c)
        parts.append(size.encode() + draw(ext) + b"\r\n" + c + b"\r\n")
    parts.append(draw(st.sampled_from([b"0", b"000"])) + draw(ext) + b"\r\n")
    parts += draw(st.lists(st.sampled_from([b"X-T: v\r\n", b"Expires: 0\r\n", b"junk\r\n"]), max_size=3))
    parts.append(b"\r\n")
    return b"".join(parts), b"".join(chunks)


_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\n]*)?\r\n")


def reference_chunked(data: bytes) -> tuple[bytes, int] | str:
    """A whole-buffer chunked decoder with ChunkedDecoder's grammar and limits
    (lines up to MAX_SIZE_LINE, trailers up to MAX_TRAILERS, extensions and
    trailers dropped): (payload, bytes used), "incomplete" or "error"."""
    pos, out, trailers = 0, [], None

    def line_at(p: int) -> tuple[bytes, int] | str:
        nl = data.find(b"\n", p)
        if nl < 0:
            return "error" if len(data) - p > MAX_SIZE_LINE else "incomplete"
        if nl + 1 - p > MAX_SIZE_LINE:
            return "error"
        return data[p : nl + 1], nl + 1

    while True:
        got = line_at(pos)
        if isinstance(got, str):
            return got
        line, after = got
        if trailers is not None:
            if not line.endswith(b"\r\n"):
                return "error"
            if line == b"\r\n":
                return b"".join(out), after
            trailers += len(line) - 2
            if trailers > MAX_TRAILERS:
                return "error"
            pos = after
            continue
        m = _SIZE_LINE.fullmatch(line)
        if m is None:
            return "error"
        size = int(m.group(1), 16)
        if size == 0:
            trailers, pos = 0, after
            continue
        if len(data) < after + size + 2:
            tail = data[after + size :]
            return "incomplete" if b"\r\n".startswith(tail) or len(data) < after + size else "error"
        if data[after + size : after + size + 2] != b"\r\n":
            return "error"
        out.append(data[after : after + size])
        pos = after + size + 2


def h11_chunked_payload(framed: bytes) -> bytes:
    """Decode lbc's re-framed body with h11 (it must be whole and valid)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + framed)
    assert isinstance(conn.next_event(), h11.Request)
    payload = []
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            payload.append(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage), (event, framed)
            return b"".join(payload)


def check_chunked(data: bytes, cuts: list[int]) -> None:
    """Feed `data` to a ChunkedDecoder in pieces (as reads would cut it) and
    compare with the reference decoder and h11."""
    decoder = ChunkedDecoder()
    out, used, error = [], 0, False
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            piece = data[a:b]
            framed, n = decoder.feed(piece)
            assert 0 <= n <= len(piece)
            out.append(framed)
            used += n
            if decoder.done:
                break
            assert n == len(piece), "the body had not ended, yet not all input was used"
    except ChunkError:
        error = True
    ref = reference_chunked(data)
    if error:
        assert ref == "error", (data, ref)
    elif decoder.done:
        framed = b"".join(out)
        assert isinstance(ref, tuple), (data, ref)
        assert (h11_chunked_payload(framed), used) == ref, data
        assert decoder.total == len(ref[0])
    else:
        assert ref in ("incomplete", "error"), (data, ref)  # lbc may see an error only once a line ends
        h11_chunked_payload(b"".join(out) + b"0\r\n\r\n")  # what went out so far is well-framed


@st.composite
def chunked_inputs(draw) -> tuple[bytes, list[int]]:
    body, _ = draw(chunked_bodies())
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "random"]))
    if kind == "mutated":
        body = draw(mutated([body]))
    elif kind == "random":
        body = draw(st.binary(max_size=200))
    body += draw(st.one_of(st.just(b""), st.binary(max_size=16), st.just(b"GET / HTTP/1.1\r\n\r\n")))
    return body, draw(st.lists(st.integers(0, 10_000), max_size=6))


def test_parser_path_is_never_ambiguous(request, figure, tmp_path):
    listener = next(iter(pure_router(tmp_path).listeners.values()))
    n = _count(request, PURE)
    outcomes: dict[str, int] = {}

    @_settings(request, n, timedelta(seconds=1))
    @given(requests)
    # The classic smuggling shapes, always run.
    @example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    @example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n")
    @example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n")
    @example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n")
    @example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
    @example(b"POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n")
    @example(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: content-length, host\r\nContent-Length: 3\r\n\r\nabc")
    @example(b"GET / HTTP/1.1\nHost: a\n\n")
    @example(b"GET / HTTP/1.1\r\nHost: a\r\nFoo: bar\rX-Y: z\r\n\r\n")
    # llhttp skips stray CR and LF before the request line; lbc's request line must still be the one llhttp read.
    @example(b"\r\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    @example(b"\r\r\n\rGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    def parser_path(data: bytes) -> None:
        note(f"input: {data!r}")  # hypothesis prints some bytes arguments as nothing at all
        outcome = check_request(data, listener)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    @_settings(request, n, timedelta(seconds=1))
    @given(chunked_inputs())
    @example((b"5\r\nhello\r\n0\r\n\r\n", []))
    @example((b"5\r\nhello\r\n0\r\n\r\n", [1, 3, 7, 8, 12]))
    @example((b"5\r\nhelloX\r\n0\r\n\r\n", []))
    @example((b"ffffffffffffffff\r\n", []))
    @example((b"10000000000000000\r\n", []))
    @example((b"5\nhello\r\n0\r\n\r\n", []))
    @example((b"0\r\n" + b"X: y\r\n" * 3000 + b"\r\n", [100, 5000]))
    def chunked(case: tuple[bytes, list[int]]) -> None:
        note(f"input: {case!r}")
        check_chunked(*case)

    started = time.monotonic()
    parser_path()
    chunked()
    summary = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
    figure(f"parser path: {n:,} heads ({summary}) + {n:,} chunked bodies, 0 failures "
           f"({time.monotonic() - started:.0f} s)")


# -- live: a real node ------------------------------------------------------------------------------

_ORIGIN_PATHS = (b"/slow", b"/stream", b"/mirror", b"/status", b"/close", b"/flap")  # they wait, stream or close


def live_bytes(data: bytes, listener) -> tuple[bytes, str] | None:
    """`data` completed so lbc needs nothing more from the client (the head
    ended, the declared body sent), and what lbc will do with it; None for
    a request the origin would hold up or that is too large to send."""
    for _ in range(2):
        try:
            got = through_lbc(data, listener)
        except Refused:
            return data, "refused"
        if got != WAITING:
            break
        data += b"\r\n\r\n"
    else:
        return None
    req, rest, _ = got
    if req.path.startswith(_ORIGIN_PATHS):
        return None
    if req.framing == h1.LENGTH:
        if req.length > 1 << 16:
            return None
        return data + b"x" * max(0, req.length - len(rest)), "forwarded"
    if req.framing == h1.CHUNKED:
        try:
            decoder = ChunkedDecoder()
            decoder.feed(rest)
        except ChunkError:
            return data, "refused"
        return (data, "forwarded") if decoder.done else (data + b"\r\n0\r\n\r\n", "either")
    return data, "forwarded"


def exchange(ip: str, data: bytes, timeout: float = 8.0) -> str:
    """Send `data` on a new connection; the response's status line, or
    "closed" for a close (or reset) without one."""
    with socket.create_connection((ip, HTTP_PORT), timeout=timeout, source_address=(ip, 0)) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # lbc answered and closed before taking all of it: read the answer
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n" not in buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no response within {timeout} s to {data[:300]!r}")
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise TimeoutError(f"no response within {timeout} s to {data[:300]!r}") from None
            if not chunk:
                assert not buf, (buf, data[:300])  # a close cuts no response in half
                return "closed"
            buf += chunk
        return buf[: buf.find(b"\r\n")].decode("latin-1")


def test_live_worker_survives_generated_requests(request, figure, node, origins, ip, tmp_path):
    web_origins(origins, ip)
    # Short client timeouts: a request this test predicted wrongly costs seconds, not a minute.
    node.up(config(ip, listener="timeouts: {client_header: 2s, client_body: 2s, response: 4s}"))
    assert get(ip, HTTP_PORT)[0] == 200
    pids = node.worker_pids()
    assert len(pids) == 2, pids
    listener = next(iter(pure_router(tmp_path).listeners.values()))
    batches = _count(request, LIVE_BATCHES)
    seen: dict[str, int] = {}
    sent = [0]

    def completed(data: bytes):
        return live_bytes(data, listener)

    @_settings(request, batches, None)
    @given(st.lists(requests.map(completed).filter(lambda r: r is not None), min_size=LIVE_BATCH,
                    max_size=LIVE_BATCH))
    def batch(reqs: list[tuple[bytes, str]]) -> None:
        note(f"input: {reqs!r}")
        with concurrent.futures.ThreadPoolExecutor(LIVE_BATCH) as pool:
            answers = list(pool.map(lambda r: exchange(ip, r[0]), reqs))
        sent[0] += len(reqs)
        for (data, expect), answer in zip(reqs, answers, strict=True):
            status = int(answer[9:12]) if answer.startswith("HTTP/1.1 ") and answer[9:12].isdigit() else 0
            assert answer == "closed" or status, (answer, data[:300])
            if expect == "forwarded":  # the origin parsed what lbc sent it
                assert status in (200, 101), (answer, data[:300])
            elif expect == "refused":
                assert answer == "closed" or status >= 400, (answer, data[:300])
            key = "closed" if answer == "closed" else f"{status // 100}xx"
            seen[key] = seen.get(key, 0) + 1
        assert node.worker_pids() == pids, "a worker died (or was restarted)"

    started = time.monotonic()
    batch()
    assert node.worker_pids() == pids
    assert get(ip, HTTP_PORT)[0] == 200
    summary = ", ".join(f"{v} {k}" for k, v in sorted(seen.items()))
    figure(f"live worker: {sent[0]:,} requests ({summary}), each answered within 8 s, same worker PIDs, "
           f"then 200 ({time.monotonic() - started:.0f} s)")


# -- the config path ---------------------------------------------------------------------------------


class Big:
    """An integer of `digits` nines: neither hypothesis nor a YAML dumper can
    print a Python int of more than 4,300 digits, so this is written out by
    `_flow` instead."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"Big({self.digits})"


def _flow(tree) -> str:
    """Flow-style YAML (JSON-like, but with YAML's floats and Big numbers)."""
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{_flow(str(k))}: {_flow(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, list):
        return "[" + ", ".join(_flow(v) for v in tree) + "]"
    if isinstance(tree, Big):
        return "9" * tree.digits
    if isinstance(tree, float):
        return ".nan" if tree != tree else ".inf" if tree == float("inf") else "-.inf" if tree < -1e308 else repr(tree)
    return json.dumps(tree, ensure_ascii=False)  # YAML has no surrogate-pair escapes


def _has_big(tree) -> bool:
    if isinstance(tree, dict):
        return any(_has_big(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_big(v) for v in tree)
    return isinstance(tree, Big)


def _yaml_text(tree, block: bool = True) -> str:
    if not block or _has_big(tree):
        return _flow(tree) + "\n"
    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False  # its flow style writes `{bind: 127.0.0.1:80}`, which libyaml refuses
    yaml.dump(tree, out)
    return out.getvalue()


SEEDS = [EXAMPLE.read_text()] + [p.read_text() for p in sorted((CASES / "config").glob("*.yaml"))]


def _seed_trees() -> list[dict]:
    out = []
    for text in SEEDS:
        try:
            tree = YAML(typ="safe", pure=True).load(text)
        except Exception:  # noqa: BLE001 - the cases include broken YAML on purpose
            continue
        if isinstance(tree, dict):
            out.append(json.loads(json.dumps(tree, default=str)))
    return out


SEED_TREES = _seed_trees()


def _compiles(tree: dict) -> bool:
    try:
        service.Compiled.from_config(check_document(parse_bytes(_flow(tree).encode(), "seed")))
    except LbcError:
        return False
    return True




def _values_by_key() -> dict[str, list]:
    """Every value the seeds give each key: swapping one for another keeps a
    config plausible, so that many of them compile."""
    out: dict[str, list] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if v not in out.setdefault(k, []):
                    out[k].append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for tree in SEED_TREES:
        walk(tree)
    return out


VALUES_BY_KEY = _values_by_key()
# The seeds that compile as they are (most cases are invalid on purpose): drawn half the time.
VALID_TREES = [t for t in SEED_TREES if _compiles(t)]


def _schema_keys() -> list[str]:
    keys: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads((ROOT / "schemas" / "pool.schema.json").read_text()))
    return sorted(keys)


KEYS = _schema_keys()
BIG = "9" * 5000

yaml_tokens = st.sampled_from([
    ": ", "- ", "\n", "\n  ", "\t", "{", "}", "[", "]", ",", "#", "&a ", "*a", "<<: *a", "!!python/object:os.system ",
    "!!binary ", "!x ", "---\n", "...\n", "%YAML 1.1\n", "? ", "|\n  ", ">\n  ", "'", '"', "\\", "\x00", "\ufeff",
    "\u202e", "\U0001f600", "é", "\u0085", "\u2028", BIG, "-" + BIG, "0x" + "f" * 5000, "1e999", "-.inf", ".nan",
    "1" * 40, "0o777", "1_000", "~", "null", "yes", "2001-01-01", "127.0.0.1:99999", "[::1]:80", "0s", "-1s",
    "99999999999d", "1e3GiB", "1KiB", "/dev/zero", "^(a+)+$", "(", "*.", "", " " * 200,
])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(1, 6000).map(Big),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), yaml_tokens,
    st.sampled_from(["web", "api", "127.0.0.1", "127.0.0.1:8080", "http", "https", "tcp", "udp", "round_robin",
                     "30s", "16KiB", "/api", "cookie", 1, 0, 65535, 65536, -1, 2**63, 10.5]),
)
trees = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), kids, max_size=4)),
    max_leaves=20,
)


def _paths(tree, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def config_trees(draw) -> str:
    """A case's tree with a few leaves tweaked, subtrees replaced, deleted or
    added: close enough to a config to reach the schema, semantic checks and
    the compiler."""
    seeds = st.sampled_from(VALID_TREES) | st.sampled_from(SEED_TREES)
    tree = json.loads(json.dumps(draw(seeds)))  # a fresh copy
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3, 4]))):
        path = draw(st.sampled_from(_paths(tree)))
        if not path:
            continue
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["swap", "swap", "swap", "tweak", "replace", "delete", "add"]))
        if op == "swap":
            if isinstance(path[-1], str):
                choices = VALUES_BY_KEY.get(path[-1], [])
            else:  # a list item: an item of that key's lists
                choices = [x for v in VALUES_BY_KEY.get(path[-2], []) if isinstance(v, list) for x in v]
            if choices:
                parent[path[-1]] = json.loads(json.dumps(draw(st.sampled_from(choices))))
        elif op == "tweak":
            parent[path[-1]] = draw(scalars)
        elif op == "replace":
            parent[path[-1]] = draw(trees)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(trees)
        else:
            parent.append(draw(trees))
    return _yaml_text(tree, draw(st.booleans()))


@st.composite
def text_mutations(draw) -> str:
    """A seed file with lines dropped, repeated or re-indented and tokens inserted."""
    lines = draw(st.sampled_from(SEEDS)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 5))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "repeat", "indent", "insert", "insert"]))
        if op == "drop":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 8)) + lines[i].lstrip(" ")
        else:
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + draw(st.one_of(yaml_tokens, st.text(max_size=10))) + lines[i][j:]
    return "".join(lines)


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: `width ** levels` leaves from a few hundred bytes."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def deep(n: int, kind: str) -> str:
    if kind == "flow":
        return "[" * n + "]" * n
    if kind == "map":
        return "{a: " * n + "1" + "}" * n
    if kind == "block":
        n = min(n, 2000)  # indentation grows as n squared: 2 MB of text at 2,000
        return "".join(" " * i + "a:\n" for i in range(n)) + " " * n + "b: 1\n"
    return "- " * n + "x\n"


configs = st.one_of(
    config_trees(), config_trees(), config_trees(), config_trees(), config_trees(), text_mutations(), text_mutations(),
    trees.map(_yaml_text), trees.map(lambda t: _yaml_text(t, block=False)),
    st.text(max_size=200), st.binary(max_size=200),
    st.builds(deep, st.sampled_from([10, 63, 64, 65, 1000, 100_000]), st.sampled_from(["flow", "map", "block", "seq"])),
    st.builds(alias_bomb, st.integers(1, 9), st.integers(1, 9)),
    st.sampled_from([BIG, f"version: {BIG}\n", "version: 1e999\n", f"version: 1\nglobal: {{workers: {BIG}}}\n"]),
)


def compile_text(tmp: Path, text: str | bytes) -> tuple[str, int]:
    """What `lbc compile` does with a file holding `text`: ("table", peak
    bytes) or ("LbcError", peak bytes); any other exception propagates."""
    path = tmp / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        compiled = service.compile_file(path)
        outcome = "table"
        assert compiled.data and compiled.version
    except LbcError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        outcome = "LbcError"
    return outcome, tracemalloc.get_traced_memory()[1] - before


@pytest.fixture
def traced():
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def test_alias_bomb_is_refused_in_bounded_memory(tmp_path, traced):
    for text in (alias_bomb(), alias_bomb(12, 12), "a: &x [1]\nb: {<<: *x}\n", "version: &v 1\n"):
        started = time.monotonic()
        outcome, peak = compile_text(tmp_path, text)
        assert outcome == "LbcError"
        assert peak < MEMORY_LIMIT and time.monotonic() - started < 5


def test_config_loader_fails_only_with_lbc_errors(request, figure, tmp_path, traced):
    n = _count(request, CONFIG)
    seen = {"table": 0, "LbcError": 0}
    worst = [0]

    @_settings(request, n, timedelta(seconds=5))
    @given(configs)
    @example(EXAMPLE.read_text())
    @example(f"version: {BIG}\n")
    @example(alias_bomb())
    @example(deep(100_000, "flow"))
    def config_path(text: str | bytes) -> None:
        note(f"input: {text!r}")
        outcome, peak = compile_text(tmp_path, text)
        assert peak < MEMORY_LIMIT, f"{peak / 1e6:.0f} MB"
        seen[outcome] += 1
        worst[0] = max(worst[0], peak)

    started = time.monotonic()
    config_path()
    figure(f"config: {n:,} texts ({seen['table']} tables, {seen['LbcError']} LbcErrors), 0 other exceptions, "
           f"peak {worst[0] / 1e6:.0f} MB ({time.monotonic() - started:.0f} s)")

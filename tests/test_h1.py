"""h1: request and response heads without I/O. Bytes in, decisions out.

parse_request_head is called as the proxy calls it, after llhttp accepted
the head: method, target and version are given as llhttp reports them."""

from __future__ import annotations

import pytest
from lbc_workers.proxy import h1
from lbc_workers.proxy.h1 import CHUNKED, LENGTH, NO_BODY, HeadError, HeadRules


def rules(**kw) -> HeadRules:
    base = dict(max_request_line=8192, max_head=16384, max_headers=100, remove=(), add=b"", add_names=(),
                forwarded=True, proto=b"http")
    base.update(kw)
    return HeadRules(**base)


RULES = rules()


def parse(head: bytes, rules: HeadRules = RULES, ip: bytes = b"192.0.2.1", rid: bytes = b"w0-1") -> h1.Request:
    """`head` with CRLF line ends added; the request line split as llhttp would."""
    raw = head.replace(b"\n", b"\r\n") if b"\r\n" not in head else head
    method, url, version = raw.split(b"\r\n", 1)[0].split(b" ")
    return h1.parse_request_head(raw, method, url, version.removeprefix(b"HTTP/"), rules, ip, lambda: rid)


def lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    return head[:-4].split(b"\r\n")


def sent(req: h1.Request) -> dict[bytes, list[bytes]]:
    """What the backend gets, header name (lowercase) -> values in order."""
    out: dict[bytes, list[bytes]] = {}
    for line in lines(req.head)[1:]:
        name, _, value = line.partition(b":")
        out.setdefault(name.lower(), []).append(value.strip())
    return out


def status(head: bytes, rules: HeadRules = RULES) -> int:
    with pytest.raises(HeadError) as e:
        parse(head, rules)
    return e.value.status


# -- limits, version, target, Host ----------------------------------------------------------


def test_limits_are_inclusive():
    line = b"GET /" + b"a" * 95 + b" HTTP/1.1"  # 109 bytes
    assert parse(line + b"\nHost: a\n\n", rules(max_request_line=len(line))).path == b"/" + b"a" * 95
    assert status(line + b"\nHost: a\n\n", rules(max_request_line=len(line) - 1)) == 414
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 100 + b"\r\n\r\n"
    assert parse(head, rules(max_head=len(head))).host == b"a"
    assert status(head, rules(max_head=len(head) - 1)) == 431
    three = b"GET / HTTP/1.1\nHost: a\nX-1: 1\nX-2: 2\n\n"
    assert parse(three, rules(max_headers=3))
    assert status(three, rules(max_headers=2)) == 431
    # 414 before 431: a long line in a large head is reported as the line
    assert status(b"GET /" + b"a" * 200 + b" HTTP/1.1\nHost: a\n\n", rules(max_request_line=100, max_head=100)) == 414


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2"])
def test_other_versions_get_505(version):
    with pytest.raises(HeadError) as e:
        h1.parse_request_head(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n", b"GET", b"/", version, RULES,
                              b"192.0.2.1", lambda: b"id")
    assert e.value.status == 505


def test_host_rules():
    assert status(b"GET / HTTP/1.1\nX: 1\n\n") == 400  # HTTP/1.1 needs a Host
    assert status(b"GET / HTTP/1.1\nHost: a\nHost: a\n\n") == 400  # even two equal ones
    assert status(b"GET / HTTP/1.1\nhost: a\nHOST: b\n\n") == 400
    assert parse(b"GET / HTTP/1.0\nX: 1\n\n").host == b""  # HTTP/1.0 may go without
    assert parse(b"GET / HTTP/1.1\nHost: API.Example.TEST:8080\n\n").host == b"api.example.test"
    assert parse(b"GET / HTTP/1.1\nHost: api.example.test.\n\n").host == b"api.example.test"  # as routes are
    assert parse(b"GET / HTTP/1.1\nHost: [2001:DB8::1]:8080\n\n").host == b"[2001:db8::1]"
    # a header that merely ends in "host" is not the Host
    assert status(b"GET / HTTP/1.1\nX-Host: a\n\n") == 400


def test_absolute_form_target_wins_over_host():
    req = parse(b"GET http://Other.Test:81/p/a?q=1 HTTP/1.1\nHost: ignored.test\nX: 1\n\n")
    assert (req.target, req.path, req.host) == (b"/p/a?q=1", b"/p/a", b"other.test")
    assert lines(req.head)[0] == b"GET /p/a?q=1 HTTP/1.1"
    assert sent(req)[b"host"] == [b"Other.Test:81"]
    assert sent(req)[b"x-forwarded-host"] == [b"Other.Test:81"]
    req = parse(b"GET https://a.test HTTP/1.1\n\n")  # no Host needed, no path given
    assert (req.target, req.host, sent(req)[b"host"]) == (b"/", b"a.test", [b"a.test"])
    assert status(b"GET http://user@a.test/ HTTP/1.1\nHost: a\n\n") == 400
    assert status(b"GET http:/// HTTP/1.1\nHost: a\n\n") == 400
    assert status(b"GET ftp://a.test/ HTTP/1.1\nHost: a\n\n") == 400
    assert status(b"GET a.test/x HTTP/1.1\nHost: a\n\n") == 400
    assert parse(b"OPTIONS * HTTP/1.1\nHost: a\n\n").target == b"*"


# -- framing and persistence ---------------------------------------------------------------


def test_framing():
    req = parse(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: Chunked\n\n")
    assert req.framing == CHUNKED
    assert sent(req)[b"transfer-encoding"] == [b"chunked"]  # ours, once
    assert status(b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: gzip, chunked\n\n") == 400
    req = parse(b"POST / HTTP/1.1\nHost: a\nContent-Length: 42\n\n")
    assert (req.framing, req.length, sent(req)[b"content-length"]) == (LENGTH, 42, [b"42"])
    assert parse(b"POST / HTTP/1.1\nHost: a\nContent-Length: 0\n\n").framing == NO_BODY
    assert parse(b"GET / HTTP/1.1\nHost: a\n\n").framing == NO_BODY


@pytest.mark.parametrize("version, connection, keep", [
    (b"1.1", None, True), (b"1.1", b"close", False), (b"1.1", b"Keep-Alive, CLOSE", False),
    (b"1.0", None, False), (b"1.0", b"keep-alive", True), (b"1.0", b"Keep-Alive", True), (b"1.0", b"close", False),
])
def test_keep_alive(version, connection, keep):
    head = b"GET / HTTP/" + version + b"\nHost: a\n" + (b"Connection: " + connection + b"\n" if connection else b"") + b"\n"
    req = parse(head)
    assert req.keep_alive is keep and req.version == version
    assert b"connection" not in sent(req)


# -- hop-by-hop headers --------------------------------------------------------------------


def test_hop_by_hop_headers_are_removed():
    req = parse(b"GET / HTTP/1.1\nHost: a\nConnection: keep-alive, X-Private, x-other\nX-Private: 1\n"
                b"X-Other: 2\nx-other: 3\nKeep-Alive: timeout=5\nTE: trailers\nTrailer: X-Sum\n"
                b"Proxy-Connection: keep-alive\nUpgrade: h2c\nX-Connection: kept\nTE-Extra: kept\n"
                b"X-Private-2: kept\n\n")
    got = sent(req)
    for name in (b"connection", b"x-private", b"x-other", b"keep-alive", b"te", b"trailer", b"proxy-connection",
                 b"upgrade"):
        assert name not in got, name
    # names that only start or end like a hop-by-hop one stay
    assert got[b"x-connection"] == got[b"te-extra"] == got[b"x-private-2"] == [b"kept"]
    assert not req.upgrade  # Upgrade without "Connection: upgrade" is not an upgrade
    assert req.request_id == b"w0-1"


def test_connection_cannot_remove_framing_or_host():
    req = parse(b"POST / HTTP/1.1\nHost: a\nConnection: content-length, host, x-request-id\nContent-Length: 5\n"
                b"X-Request-ID: theirs\n\n")
    got = sent(req)
    assert got[b"content-length"] == [b"5"] and got[b"host"] == [b"a"]
    assert (req.framing, req.length) == (LENGTH, 5)
    # X-Request-ID may go, as the client asked; then lbc makes one
    assert got[b"x-request-id"] == [b"w0-1"] and req.request_id == b"w0-1"


def test_upgrade_keeps_upgrade():
    req = parse(b"GET /ws HTTP/1.1\nHost: a\nConnection: keep-alive, Upgrade\nUpgrade: websocket\n"
                b"Sec-WebSocket-Key: k\n\n")
    assert req.upgrade
    got = sent(req)
    assert got[b"upgrade"] == [b"websocket"] and got[b"connection"] == [b"upgrade"]
    assert got[b"sec-websocket-key"] == [b"k"]


# -- forwarded headers and the listener's rules -------------------------------------------


def test_forwarded_headers():
    got = sent(parse(b"GET / HTTP/1.1\nHost: app.test:8080\n\n", ip=b"198.51.100.7"))
    assert got[b"x-forwarded-for"] == [b"198.51.100.7"]
    assert got[b"x-forwarded-proto"] == [b"http"]
    assert got[b"x-forwarded-host"] == [b"app.test:8080"]
    assert got[b"x-request-id"] == [b"w0-1"]
    got = sent(parse(b"GET / HTTP/1.1\nHost: a\nX-Forwarded-For: 203.0.113.1, 203.0.113.2\n"
                     b"x-forwarded-for: 203.0.113.3\nX-Forwarded-Proto: https\nX-Forwarded-Host: evil\n"
                     b"X-Request-ID: abc\n\n", rules(proto=b"https"), ip=b"198.51.100.7"))
    assert got[b"x-forwarded-for"] == [b"203.0.113.1, 203.0.113.2, 203.0.113.3, 198.51.100.7"]
    assert got[b"x-forwarded-proto"] == [b"https"] and got[b"x-forwarded-host"] == [b"a"]
    assert got[b"x-request-id"] == [b"abc"]
    req = parse(b"GET / HTTP/1.1\nHost: a\nX-Request-ID:\n\n")  # an empty one is replaced
    assert sent(req)[b"x-request-id"] == [b"w0-1"] and req.request_id == b"w0-1"


def test_forwarded_headers_off():
    head = b"GET / HTTP/1.1\nHost: a\nX-Forwarded-For: 203.0.113.1\nX-Forwarded-Proto: https\n\n"
    req = parse(head, rules(forwarded=False))
    got = sent(req)
    assert got[b"x-forwarded-for"] == [b"203.0.113.1"] and got[b"x-forwarded-proto"] == [b"https"]
    assert b"x-forwarded-host" not in got and b"x-request-id" not in got and req.request_id == b""


def test_add_and_remove_rules():
    r = rules(remove=(b"x-secret", b"cookie"), add=b"x-env: prod\r\n", add_names=(b"x-env",))
    req = parse(b"GET / HTTP/1.1\nHost: a\nX-Secret: 1\nCookie: a=b\ncookie: c=d\nX-Env: dev\nX-Secret-Not: 2\n\n", r)
    got = sent(req)
    assert b"x-secret" not in got and b"cookie" not in got
    assert got[b"x-env"] == [b"prod"] and got[b"x-secret-not"] == [b"2"]
    # the rules read the original head: routes still see what the client sent
    assert req.header(b"cookie") == b"a=b" and req.header(b"x-env") == b"dev"


def test_untouched_head_is_forwarded_byte_for_byte():
    head = b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nUser-Agent: x/1 (y; z)\r\nAccept: */*\r\n\r\n"
    req = h1.parse_request_head(head, b"GET", b"/a?b=c", b"1.1", rules(forwarded=False), b"192.0.2.1", lambda: b"id")
    assert req.head == head
    # the request line is rebuilt from what llhttp read: extra spaces do not reach the backend
    req = h1.parse_request_head(b"GET  /a HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", b"/a", b"1.1",
                                rules(forwarded=False), b"192.0.2.1", lambda: b"id")
    assert req.head == b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"


# -- responses -------------------------------------------------------------------------------


def lower(raw: bytes, add: bytes = b"", upgrade: bool = False, connection: bytes | None = None,
          method: bytes = b"GET") -> bytes:
    names = tuple(line.split(b":", 1)[0].lower() for line in add.split(b"\r\n") if line)
    rules = h1.ResponseRules(add, names)
    return h1.lower_response(h1.parse_response_head(raw, method, upgrade, rules), rules, connection)


def test_response_hop_by_hop_headers_are_removed():
    raw = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop, Content-Length, Transfer-Encoding\r\n"
           b"Keep-Alive: timeout=5\r\nX-Hop: 1\r\nProxy-Connection: x\r\nTrailer: X-Sum\r\nUpgrade: h2\r\n"
           b"Keep-Alive-Extra: kept\r\nContent-Length: 3\r\n\r\n")
    assert lines(lower(raw)) == [b"HTTP/1.1 200 OK", b"Keep-Alive-Extra: kept", b"Content-Length: 3"]
    chunked = b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert lines(lower(chunked)) == [b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"]


def test_response_connection_and_added_headers():
    raw = b"HTTP/1.1 200 OK\r\nX-Served-By: backend\r\nx-served-by: again\r\nContent-Length: 0\r\n\r\n"
    out = lower(raw, b"X-Served-By: lbc\r\n", connection=b"close")
    assert lines(out) == [b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Connection: close", b"X-Served-By: lbc"]
    keep = lower(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n", connection=b"keep-alive")
    assert lines(keep) == [b"HTTP/1.0 200 OK", b"Connection: keep-alive"]
    plain = b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"
    assert lower(plain) is plain  # nothing to do: no copy


def test_switching_protocols_keeps_its_upgrade_pair():
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nKeep-Alive: 1\r\n\r\n"
    out = lower(raw, upgrade=True)
    assert lines(out) == [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade"]


def test_response_framing_and_reuse():
    rules = h1.ResponseRules(b"", ())

    def parse(raw: bytes, method: bytes = b"GET") -> h1.Response:
        return h1.parse_response_head(raw, method, False, rules)

    r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
    assert (r.status, r.framing, r.length, r.keep_alive) == (200, h1.LENGTH, 12, True)
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", b"HEAD").framing == h1.NO_BODY
    assert parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n").framing == h1.NO_BODY
    assert parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").framing == h1.CHUNKED
    closed = parse(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\n")
    assert (closed.framing, closed.keep_alive) == (h1.CLOSE_DELIMITED, False)
    assert not parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert not parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert parse(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n").keep_alive
    # the same length twice is one length; two lengths, or not a number, is a broken backend
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").length == 3
    for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
                b"HTTP/1.1 2000 OK\r\n\r\n", b"ICY 200 OK\r\n\r\n"):
        with pytest.raises(h1.HeadError) as e:
            parse(bad)
        assert e.value.status == 502


def test_error_response():
    out = h1.error_response(503, True, b"w0-9")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nConnection: close" in head and b"\r\nX-Request-ID: w0-9" in head
    assert b"\r\nContent-Length: %d" % len(body) in head and 0 < len(body) < 100
    assert b"Connection" not in h1.error_response(404, False)


def test_a_backend_keep_alive_head_passes_unchanged_when_the_client_stays():
    nginx = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
             b"Connection: keep-alive\r\n\r\n")
    assert lower(nginx) is nginx  # Connection: keep-alive is then lbc's own option: no copy
    assert b"Connection: keep-alive" not in lower(nginx, connection=b"close")
    assert lines(lower(nginx, connection=b"close"))[-1] == b"Connection: close"
    with_timeout = nginx.replace(b"\r\n\r\n", b"\r\nKeep-Alive: timeout=5\r\n\r\n")
    assert b"Keep-Alive" not in lower(with_timeout) and b"Connection" not in lower(with_timeout)
    closing = nginx.replace(b"keep-alive", b"close")
    assert b"Connection" not in lower(closing)  # the backend's close is not the client's


def test_the_fast_path_gives_what_the_general_path_gives():
    """Heads the fast path takes (origin-form, only Host and X-Request-ID among
    the headers rules act on) lower exactly as the general path lowers them."""
    import random

    rng = random.Random(7)
    names = [b"Accept", b"User-Agent", b"Cookie", b"X-Request-Id", b"x-request-id", b"Referer", b"X-Custom"]
    for i in range(300):
        lines = [b"Host: " + rng.choice([b"a.example", b"A.Example:8080", b"[::1]:80", b"b.example.", b"127.0.0.1:80"])]
        for _ in range(rng.randrange(6)):
            lines.append(rng.choice(names) + b": " + rng.choice([b"v", b" spaced ", b"x-" + str(i).encode(), b""]))
        rng.shuffle(lines)
        url = rng.choice([b"/", b"/a?b=c", b"/p/q", b"/x?y"])
        version = rng.choice([b"1.1", b"1.0"])
        raw = b"GET " + url + b" HTTP/" + version + b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"
        for r in (RULES, rules(forwarded=False), rules(add=b"X-Env: prod\r\n", add_names=(b"x-env",))):
            low = raw.lower()
            fast = h1._plain_request(raw, low, b"GET", url, version, r, b"192.0.2.1", lambda: b"gen-1")
            general = h1._general_request(raw, low, raw.find(b"\r\n"), b"GET", url, version, r, b"192.0.2.1",
                                          lambda: b"gen-1")
            if fast is not None:
                assert fast == general, raw


def test_plain_responses_are_what_the_general_path_passes_unchanged():
    import random

    rng = random.Random(11)
    extra = [b"Server: nginx", b"Date: Sun, 29 Nov 2026 21:00:00 GMT", b"Connection: keep-alive",
             b"Connection: close", b"Keep-Alive: timeout=5", b"Content-Length: 3", b"content-length: 3",
             b"Content-Length: 4", b"Transfer-Encoding: chunked", b"X-Served-By: backend", b"Connection: x-hop"]
    for rules in (h1.ResponseRules(b"", ()), h1.ResponseRules(b"X-Served-By: lbc\r\n", (b"x-served-by",))):
        for _ in range(400):
            status = rng.choice([b"200 OK", b"404 Not Found", b"503 X", b"204 No Content", b"304 X", b"101 X"])
            version = rng.choice([b"HTTP/1.1 ", b"HTTP/1.0 "])
            lines = rng.sample(extra, rng.randrange(4))
            raw = version + status + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"
            method = rng.choice([b"GET", b"HEAD"])
            n = h1.plain_response_length(raw, method, rules)
            if n < 0:
                continue
            resp = h1.parse_response_head(raw, method, False, rules)
            assert (resp.framing, resp.length, resp.keep_alive) == (h1.LENGTH, n, True), raw
            assert h1.lower_response(resp, rules, None) is raw, raw

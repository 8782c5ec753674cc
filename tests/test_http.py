"""The HTTP proxy end to end: a real node (supervisord + one worker), real
origin processes, and raw sockets on the client side, so that what the
backend received (/echo returns the request head it got) and what the
client got (bytes on the wire) are both checked, not what a client library
makes of them."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import psutil
import pytest
from support.client import Client, build, send_raw

pytestmark = pytest.mark.timeout(60)

PATTERN = bytes(range(256)) * 256  # what the origin's /stream sends, repeated


# -- helpers -----------------------------------------------------------------------------


def config(ip: str, *, listener: str = "", routes: str = "      - {pool: web}", pools: str | None = None,
           listeners: str = "", workers: int = 1) -> str:
    """One http listener `web` on IP:8080 (extra keys in `listener`, its
    routes in `routes`), pool `web` with the origin on IP:9101 unless
    `pools` says otherwise, and more listeners in `listeners`."""
    if pools is None:
        pools = pool("web", f"{{id: web-1, address: {ip}, port: 9101}}")
    return "\n".join([
        "version: 1",
        f"global: {{workers: {workers}, drain_timeout: 1s}}",
        "listeners:",
        "  - name: web",
        f"    bind: \"{ip}:8080\"",
        *(f"    {line}" for line in listener.strip("\n").splitlines() if line.strip()),
        "    routes:",
        routes.rstrip("\n"),
        listeners.rstrip("\n"),
        "pools:",
        pools.rstrip("\n"),
    ]) + "\n"


def pool(name: str, *backends: str, extra: str = "") -> str:
    lines = [f"  - name: {name}"]
    if extra:
        lines.append(f"    {extra}")
    lines.append("    backends:" if backends else "    backends: []")
    lines += [f"      - {b}" for b in backends]
    return "\n".join(lines) + "\n"


def established(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` on local port `port`."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


class RawBackend:
    """A scripted backend in this test process: `handler(conn, index, self)`
    runs in a thread for each accepted connection (index counts from 0).
    What a handler raises, other than a closed connection, fails the test."""

    def __init__(self, ip: str, port: int, handler) -> None:
        self.sock = socket.create_server((ip, port))
        self.sock.settimeout(0.2)
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self.sink_closed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(10)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()
            index += 1

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            self.handler(conn, index, self)
        except (OSError, EOFError):
            pass  # lbc closed the connection
        except Exception as e:
            self.errors.append(e)
        finally:
            conn.close()

    def read_head(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(1)  # byte by byte: never read past the head
            if not chunk:
                return data
            data += chunk
        return data

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def raw_backends():
    started: list[RawBackend] = []

    def start(ip: str, port: int, handler) -> RawBackend:
        b = RawBackend(ip, port, handler)
        started.append(b)
        return b

    try:
        yield start
    finally:
        for b in started:
            b.stop()
    assert [e for b in started for e in b.errors] == []


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def scripted(conn: socket.socket, index: int, backend: RawBackend) -> None:
    """What the scripted backend does, by path (connection `index` counts
    from 0; `n` counts requests on this connection):
      /raw/hop       200 with hop-by-hop headers of its own
      /raw/304       304 with the Content-Length of the representation, no body
      /raw/204       204 without Content-Length
      /raw/continue  100 Continue after the head, then echoes the body
      /raw/flaky     answers the first request on a connection, closes on the next
      /raw/sink      reads until the connection ends, then sets backend.sink_closed
      anything else  200 "raw"
    """
    n = 0
    while head := backend.read_head(conn):
        path = head.split(b" ")[1]
        low = head.lower()
        length = int(low.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in low else 0
        if path == b"/raw/sink":
            while conn.recv(65536):
                pass
            backend.sink_closed.set()
            return
        if path == b"/raw/flaky" and n > 0:
            recv_exactly(conn, length)
            return
        if path == b"/raw/continue":
            assert b"expect: 100-continue" in low
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = recv_exactly(conn, length)
        if path == b"/raw/hop":
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5, max=100\r\n"
                         b"X-Hop: secret\r\nProxy-Connection: keep-alive\r\nX-End: 1\r\nContent-Length: 5\r\n\r\nhello")
        elif path == b"/raw/304":
            conn.sendall(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n")
        elif path == b"/raw/204":
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif path == b"/raw/continue":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif path == b"/raw/flaky":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nconn-%d" % (len(b"conn-%d" % index), index))
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nraw")
        n += 1


def with_raw(ip: str, default: str = "      - {pool: web}") -> dict:
    """config() arguments: /raw/... goes to the scripted backend on IP:9109,
    the rest as `default` routes it to the origin on IP:9101."""
    return {
        "routes": "      - {match: {path_prefix: /raw/}, pool: raw}\n" + default,
        "pools": pool("web", f"{{id: web-1, address: {ip}, port: 9101}}")
        + pool("raw", f"{{id: raw-1, address: {ip}, port: 9109}}"),
    }


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n == name]



# -- request heads: forwarded headers, header rules, hop-by-hop --------------------------------


def test_request_headers(node, origins, ip, tmp_path):
    log = tmp_path / "origin.log"
    origins("web-1", http=[f"{ip}:9101"], log=log)
    node.up(config(ip, listeners=f"""
  - name: rules
    bind: "{ip}:8081"
    add_request_headers: {{X-Env: prod, X-Team: edge}}
    remove_request_headers: [X-Secret, cookie]
    add_response_headers: {{X-Served-By: lbc, X-Backend: hidden}}
    routes: [{{pool: web}}]
  - name: bare
    bind: "{ip}:8082"
    forwarded_headers: false
    routes: [{{pool: web}}]
"""))
    with Client(ip) as c:
        # X-Forwarded-*: added; the client's For appended to, Proto and Host replaced
        plain = c.request(path="/echo", host="app.test:8080").echo()["headers"]
        assert values(plain, "x-forwarded-for") == [ip]
        assert values(plain, "x-forwarded-proto") == ["http"]
        assert values(plain, "x-forwarded-host") == ["app.test:8080"]
        assert values(plain, "host") == ["app.test:8080"]
        chained = c.request(path="/echo", headers={
            "X-Forwarded-For": "203.0.113.7, 198.51.100.2", "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.test", "X-Request-ID": "client-chosen-42",
        }).echo()["headers"]
        assert values(chained, "x-forwarded-for") == [f"203.0.113.7, 198.51.100.2, {ip}"]
        assert values(chained, "x-forwarded-proto") == ["http"]
        assert values(chained, "x-forwarded-host") == ["example.test"]
        assert values(chained, "x-request-id") == ["client-chosen-42"]  # kept as it came
        # several X-Forwarded-For lines are one list
        c.send(b"GET /echo HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 192.0.2.1\r\n"
               b"X-Forwarded-For: 192.0.2.2\r\n\r\n")
        assert values(c.response().echo()["headers"], "x-forwarded-for") == [f"192.0.2.1, 192.0.2.2, {ip}"]
        # generated request ids: one per request, unique, one prefix per worker
        ids = [values(c.request(path="/echo").echo()["headers"], "x-request-id") for _ in range(20)]
        ids += [values(plain, "x-request-id")]
        assert all(len(i) == 1 for i in ids)
        ids = [i[0] for i in ids]
        assert len(set(ids)) == len(ids)
        assert len({i.rsplit("-", 1)[0] for i in ids}) == 1 and all(i.rsplit("-", 1)[1] for i in ids)

        # hop-by-hop: Connection, what it lists, Keep-Alive, TE, Trailer, Proxy-Connection
        seen = c.request(path="/echo", headers={
            "Connection": "keep-alive, X-Private, x-other-private", "X-Private": "1", "X-Other-Private": "2",
            "Keep-Alive": "timeout=30", "TE": "trailers", "Trailer": "X-Checksum",
            "Proxy-Connection": "keep-alive", "X-Public": "yes",
        }).echo()["headers"]
        names = {n for n, _ in seen}
        assert not names & {"connection", "x-private", "x-other-private", "keep-alive", "te", "trailer",
                            "proxy-connection"}, seen
        assert ("x-public", "yes") in seen

        # Connection cannot take away the framing (a body smuggled as a
        # second request) or the Host
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
        r = c.request("POST", "/echo", headers={"Connection": "content-length, host, x-request-id",
                                                "X-Request-ID": "dropped"}, body=smuggled)
        echo = r.echo()
        assert echo["body_len"] == len(smuggled)
        assert values(echo["headers"], "host") == ["example.test"]
        assert values(echo["headers"], "content-length") == [str(len(smuggled))]
        assert values(echo["headers"], "x-request-id") not in ([], ["dropped"])  # a generated one
        assert c.request(path="/").status == 200
    assert "/smuggled" not in log.read_text()

    with Client(ip, 8081) as c:
        r = c.request(path="/echo", headers={"X-Env": "dev", "X-Secret": "s3cret", "Cookie": "a=b",
                                             "X-Other": "kept"})
        seen = r.echo()["headers"]
        assert values(seen, "x-env") == ["prod"] and values(seen, "x-team") == ["edge"]
        assert values(seen, "x-other") == ["kept"]
        assert not {n for n, _ in seen} & {"x-secret", "cookie"}
        assert r.one("x-served-by") == "lbc"
        root = c.request(path="/")  # the origin sets X-Backend here: the listener's value replaces it
        assert root.get("x-backend") == ["hidden"] and root.one("x-served-by") == "lbc"

    with Client(ip, 8082) as c:
        r = c.request(path="/echo", headers={"X-Forwarded-For": "192.0.2.9", "X-Forwarded-Proto": "https"})
        seen = r.echo()["headers"]
        assert values(seen, "x-forwarded-for") == ["192.0.2.9"]  # untouched
        assert values(seen, "x-forwarded-proto") == ["https"]
        assert not {n for n, _ in seen} & {"x-request-id", "x-forwarded-host"}
        assert r.one("x-served-by") is None


# -- upgrade ---------------------------------------------------------------------------------


def test_upgrade_is_tunnelled(node, origins, ip, tmp_path):
    log = tmp_path / "origin.log"
    origins("web-1", http=[f"{ip}:9101"], log=log)
    node.up(config(ip))
    upgrade = build("GET", "/ws", {"Connection": "keep-alive, Upgrade", "Upgrade": "websocket",
                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    with Client(ip) as c:
        c.send(upgrade)
        r = c.response()
        assert r.status == 101, r.head
        assert r.one("upgrade") == "websocket" and r.one("connection").lower() == "upgrade"
        for payload in (b"hello", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 1024):
            c.send(payload)
            assert c.exactly(len(payload)) == payload
    head = json.loads(log.read_text().splitlines()[0])
    sent = {n.lower(): v for n, v in head["headers"]}
    assert sent["upgrade"] == "websocket" and sent["connection"].lower() == "upgrade"
    assert sent["sec-websocket-key"] == "dGhlIHNhbXBsZSBub25jZQ=="

    # bytes the client sends right behind the head (before the 101) go through too
    with Client(ip) as c:
        c.send(upgrade + b"early bytes")
        assert c.response().status == 101
        assert c.exactly(len(b"early bytes")) == b"early bytes"
        c.send(b"later")
        assert c.exactly(5) == b"later"


# -- routes ----------------------------------------------------------------------------------


def test_routes_first_match_wins(node, origins, ip):
    names = ["api", "wild", "regex", "posts", "canary", "docs"]
    for i, name in enumerate(names):
        origins(name, http=[f"{ip}:{9101 + i}"])
    node.up(config(ip, routes="""
      - {match: {host: api.example.test}, pool: api}
      - {match: {host: "*.example.test", path_prefix: /img/}, pool: wild}
      - {match: {path_regex: "/v[0-9]+/"}, pool: regex}
      - {match: {method: [POST, PUT]}, pool: posts}
      - {match: {headers: {X-Canary: "yes"}}, pool: canary}
      - {match: {path_prefix: /docs}, pool: docs}
""", pools="".join(pool(n, f"{{id: {n}-1, address: {ip}, port: {9101 + i}}}") for i, n in enumerate(names))))

    def who(method="GET", path="/", host="example.test", headers=None) -> str | int:
        with Client(ip) as c:
            r = c.request(method, path, headers=headers, host=host,
                          body=b"x" if method in ("POST", "PUT") else b"")
            return r.body.decode().strip() if r.status == 200 else r.status

    assert who(host="api.example.test") == "api"
    assert who(host="API.Example.Test:8080") == "api"  # case and port do not matter
    assert who(host="api.example.test.") == "api"  # nor a trailing dot
    assert who(host="api.example.test", path="/img/a.png") == "api"  # the first match wins
    assert who(host="cdn.example.test", path="/img/a.png") == "wild"
    assert who(host="a.b.example.test", path="/img/") == "wild"
    assert who(host="example.test", path="/img/a.png") == 404  # *.suffix needs a subdomain
    assert who(host="notexample.test", path="/img/a.png") == 404
    assert who(host="cdn.example.test", path="/images") == 404
    assert who(path="/v2/users") == "regex"
    assert who(path="/api/v2/users") == 404  # matched from the start of the path
    assert who(path="/v2/users?q=1") == "regex"
    assert who("POST", "/v1/x") == "regex"
    assert who("POST", "/anything") == "posts"
    assert who("PUT", "/anything") == "posts"
    assert who("DELETE", "/anything") == 404
    assert who(headers={"X-Canary": "yes"}) == "canary"
    assert who(headers={"x-canary": "yes"}) == "canary"  # names are case-insensitive
    assert who(headers={"X-Canary": "no"}) == 404
    assert who(path="/docs/intro?x=/v1/") == "docs"  # the query is not part of the path
    assert who(path="/other") == 404
    with Client(ip) as c:  # a 404 keeps the connection usable
        r = c.request(path="/nowhere")
        assert r.status == 404 and 0 < len(r.body) < 100 and r.one("connection") is None
        assert c.request(path="/docs").body == b"docs\n"


# -- bodies ----------------------------------------------------------------------------------


def test_bodies_stream_both_ways(node, origins, raw_backends, ip):
    origins("web-1", http=[f"{ip}:9101"])
    raw = raw_backends(ip, 9109, scripted)
    node.up(config(ip, **with_raw(ip)))
    body = bytes(range(256)) * 4096  # 1 MiB
    with Client(ip, timeout=20) as c:
        # Content-Length
        echo = c.request("POST", "/echo", body=body).echo()
        assert echo["body_len"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()

        # chunked, in pieces, with extensions and trailers: re-framed for the backend
        pieces = [b"a", b"b" * 1000, body[:300000], b"\r\n0\r\n\r\n", b"z"]
        framed = b"".join(b"%x;ext=1\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\nX-Trailer: t\r\n\r\n"
        c.send(build("POST", "/echo", {"Transfer-Encoding": "chunked"}) + framed[:5000])
        time.sleep(0.05)
        c.send(framed[5000:])
        echo = c.response().echo()
        whole = b"".join(pieces)
        assert echo["body_len"] == len(whole) and echo["body_sha256"] == hashlib.sha256(whole).hexdigest()
        names = [n for n, _ in echo["headers"]]
        assert names.count("transfer-encoding") == 1 and "content-length" not in names and "x-trailer" not in names

        # both directions at once: /mirror answers each piece as it arrives
        c.send(build("POST", "/mirror", {"Transfer-Encoding": "chunked"}))
        status, head = c.head()
        assert status == 200 and b"chunked" in head.lower()
        for piece in (b"first", b"second" * 1000):
            c.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            got = b""
            while len(got) < len(piece):
                size = int(c.until(b"\r\n")[:-2], 16)
                got += c.exactly(size)
                assert c.exactly(2) == b"\r\n"
            assert got == piece
        c.send(b"0\r\n\r\n")
        assert c.until(b"0\r\n\r\n") == b"0\r\n\r\n"

    # 100-continue: the backend's 100 reaches the client before it sends the body
    with Client(ip) as c:
        c.send(build("POST", "/raw/continue", {"Expect": "100-continue", "Content-Length": "11"}))
        status, _ = c.head()
        assert status == 100
        c.send(b"hello world")
        r = c.response(b"POST")
        assert r.status == 200 and r.body == b"hello world"
        # a backend that never says 100: a client that sends the body anyway is served
        c.send(build("POST", "/echo", {"Expect": "100-continue", "Content-Length": "5"}))
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.fill()
        c.sock.settimeout(10)
        c.send(b"12345")
        r = c.response(b"POST")
        assert r.status == 200 and r.echo()["body_len"] == 5

    # responses without a body
    with Client(ip) as c:
        r = c.request("HEAD", "/echo")
        assert r.status == 200 and int(r.one("content-length")) > 0
        for path in ("/status/204", "/status/304", "/raw/304", "/raw/204"):
            r = c.request(path=path)
            assert r.status == int(path[-3:]), r
        assert c.request(path="/raw/other").body == b"raw"
        assert c.buf == b""
        assert c.request(path="/").body == b"web-1\n"  # nothing was left over on either side

    # a large chunked response, read to the end, byte for byte
    with Client(ip, timeout=30) as c:
        n = 50_000_000
        c.send(build("GET", f"/stream?n={n}"))
        status, head = c.head()
        assert status == 200 and b"transfer-encoding: chunked" in head.lower()
        digest, expected, total = hashlib.sha256(), hashlib.sha256(), 0
        while True:
            size = int(c.until(b"\r\n")[:-2].split(b";")[0], 16)
            if size == 0:
                assert c.until(b"\r\n") == b"\r\n"
                break
            digest.update(c.exactly(size))
            assert c.exactly(2) == b"\r\n"
            total += size
        for offset in range(0, n, len(PATTERN)):
            expected.update(PATTERN[: min(len(PATTERN), n - offset)])
        assert total == n and digest.hexdigest() == expected.hexdigest()
        assert c.request(path="/").status == 200  # and the connection is still good

    # a malformed chunk after the backend got part of the body: 400, and the
    # backend connection (in an unknown state) is dropped, not kept
    with Client(ip) as c:
        c.send(build("POST", "/raw/sink", {"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n")
        time.sleep(0.3)
        c.send(b"zz\r\n")
        r = c.response()
        assert r.status == 400 and r.one("connection") == "close"
        assert c.closed_within(2)
    assert raw.sink_closed.wait(3)
    # the same after part of the response went out: the client is cut off,
    # no error response lands in the middle of the body
    with Client(ip) as c:
        c.send(build("POST", "/mirror", {"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n")
        status, _ = c.head()
        assert status == 200 and c.until(b"hello\r\n") == b"5\r\nhello\r\n"
        c.send(b"zz\r\n")
        try:
            rest = c.read_to_close()
        except ConnectionResetError:
            rest = b""
        assert b"HTTP/1.1" not in rest


# -- errors ----------------------------------------------------------------------------------


def test_backend_errors_and_max_connections(node, origins, ip):
    origins("web-1", http=[f"{ip}:9101", f"{ip}:9102"])
    node.up(config(ip, listener="timeouts: {response: 1s, connect: 1s}", routes="""
      - {match: {path_prefix: /down}, pool: down}
      - {match: {path_prefix: /empty}, pool: empty}
      - {pool: web}
""", listeners=f"""
  - name: limited
    bind: "{ip}:8081"
    timeouts: {{connect: 1s}}
    routes: [{{pool: limited}}]
""", pools=pool("web", f"{{id: web-1, address: {ip}, port: 9101}}")
        + pool("down", f"{{id: down-1, address: {ip}, port: 9109}}")  # nothing listens there
        + pool("empty", extra="dynamic_backends: true")
        + pool("limited", f"{{id: limited-1, address: {ip}, port: 9102, max_connections: 1}}")))
    with Client(ip) as c:
        r = c.request(path="/down")  # connection refused
        assert r.status == 502 and 0 < len(r.body) < 100
        r = c.request(path="/empty")  # a pool without a backend
        assert r.status == 503 and 0 < len(r.body) < 100
        assert c.request(path="/").status == 200  # the connection survived both
        start = time.monotonic()
        r = c.request(path="/slow?s=5")
        elapsed = time.monotonic() - start
        assert r.status == 504 and 0 < len(r.body) < 100
        assert r.one("connection") == "close"  # the backend's answer may still come: this stream is done
        assert 0.9 < elapsed < 3, elapsed  # 1 s, plus the sweep
        assert c.closed_within(1)
    with Client(ip) as c:
        assert c.request(path="/").status == 200

    # max_connections 1: while a slow request holds the only slot, the next
    # waits, and gets 503 after the connect timeout
    results: dict = {}

    def slow(s: float) -> None:
        with Client(ip, 8081) as c:
            results["slow"] = c.request(path=f"/slow?s={s}&n=3").status

    t = threading.Thread(target=slow, args=(3,))
    t.start()
    time.sleep(0.3)
    with Client(ip, 8081) as c:
        start = time.monotonic()
        r = c.request(path="/")
        waited = time.monotonic() - start
    assert r.status == 503 and 0.9 < waited < 3, (r, waited)  # 1 s, plus the sweep
    t.join(10)
    assert results.pop("slow") == 200
    # ... and is served when the slot frees up in time
    t = threading.Thread(target=slow, args=(0.5,))
    t.start()
    time.sleep(0.2)
    with Client(ip, 8081) as c:
        start = time.monotonic()
        r = c.request(path="/")
        waited = time.monotonic() - start
    t.join(10)
    assert r.status == 200 and 0.1 < waited < 2, waited
    assert results["slow"] == 200


MALFORMED = [
    ("bad request line", b"GARBAGE\r\n\r\n"),
    ("bad method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n"),
    ("bare LF in a header", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n"),
    ("bare LF before CRLF", b"GET / HTTP/1.1\r\nHost: a\n\r\n"),
    ("bare LF, head unfinished", b"GET / HTTP/1.1\r\nHost: a\nX"),
    ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n"),
    ("missing Host", b"GET / HTTP/1.1\r\nX: b\r\n\r\n"),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("TE not chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n"),
    ("NUL", b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n"),
    ("bad target", b"GET example.test/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bad chunk size", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
]


def test_malformed_and_oversized_requests(node, origins, ip):
    origins("web-1", http=[f"{ip}:9101"])
    node.up(config(ip, listener="""
timeouts: {client_header: 5s}
limits: {max_request_head: 4KiB, max_header_count: 10, max_request_line: 1KiB, max_body: 1KiB}
"""))

    def check(data: bytes, status: int) -> tuple | None:
        start = time.monotonic()
        try:
            r, closed = send_raw(ip, data)
        except OSError as e:
            return (repr(e),)
        fast = time.monotonic() - start < 2  # at once, not at the header timeout
        if r.status == status and r.one("connection") == "close" and closed and fast and 0 < len(r.body) < 100:
            return None
        return (r.head, closed, fast)

    wrong = []
    for name, data in MALFORMED:  # each on a connection of its own
        if (got := check(data, 400)) is not None:
            wrong.append((name, got))
    big = build("GET", "/", {"X-Big": "b" * 5000})
    for name, data, status in [
        ("one header field too many", build("GET", "/", {f"X-H{i}": "v" for i in range(10)}), 431),
        ("head too large", big, 431),
        ("head too large, unfinished", big[:4500], 431),
        ("request line too long", build("GET", "/" + "a" * 1100), 414),
        ("request line too long, unfinished", b"GET /" + b"a" * 1100, 414),
        ("body too large", build("POST", "/echo", body=b"b" * 1025), 413),
        ("chunked body too large", build("POST", "/echo", {"Transfer-Encoding": "chunked"})
         + b"200\r\n" + b"b" * 512 + b"\r\n" + b"201\r\n" + b"b" * 513 + b"\r\n0\r\n\r\n", 413),
    ]:
        if (got := check(data, status)) is not None:
            wrong.append((name, got))
    assert wrong == []
    with Client(ip) as c:  # just within the limits: served
        r = c.request(path="/" + "a" * 900, headers={f"X-H{i}": "v" * 300 for i in range(9)})
        assert r.status == 200
        assert c.request("POST", "/echo", body=b"b" * 1024).echo()["body_len"] == 1024


def test_header_timeout_is_absolute_and_idle_connections_close(node, origins, ip):
    origins("web-1", http=[f"{ip}:9101"])
    node.up(config(ip, listener="timeouts: {client_header: 2s, idle: 2s}"))
    results: dict = {}

    def idle() -> None:
        with Client(ip) as c:
            assert c.request(path="/").status == 200
            start = time.monotonic()
            results["idle_closed"] = c.closed_within(6)
            results["idle"] = time.monotonic() - start

    def pipelined() -> None:
        # the start of a second head behind the first: its deadline runs from
        # when the first response is done, not from anything longer
        with Client(ip) as c:
            c.send(build("GET", "/") + b"GET / HTTP/1.1\r\nHost")
            assert c.response().status == 200
            start = time.monotonic()
            results["pipelined"] = c.response().status
            results["pipelined_after"] = time.monotonic() - start

    threads = [threading.Thread(target=idle), threading.Thread(target=pipelined)]
    for t in threads:
        t.start()
    with Client(ip) as c:
        start = time.monotonic()
        got = b""
        for byte in b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Slow: " + b"s" * 100:  # one byte per 0.5 s
            try:
                c.send(bytes([byte]))
            except OSError:
                break
            c.sock.settimeout(0.5)
            try:
                got = c.sock.recv(65536)
                break
            except TimeoutError:
                continue
        c.buf = got
        c.sock.settimeout(5)
        r = c.response()
        elapsed = time.monotonic() - start
        assert r.status == 408 and r.one("connection") == "close"
        assert c.closed_within(1)
    assert 1.9 < elapsed < 4, elapsed  # 2 s from the first byte, plus the sweep
    for t in threads:
        t.join(10)
    assert results["idle_closed"] and 1.9 < results["idle"] < 4, results
    assert results["pipelined"] == 408 and 1.9 < results["pipelined_after"] < 4, results


# -- connections -----------------------------------------------------------------------------


def test_connections(node, origins, raw_backends, ip):
    origin = origins("web-1", http=[f"{ip}:9101"])
    raw_backends(ip, 9109, scripted)
    node.up(config(ip, **with_raw(ip, default="      - {match: {host: example.test}, pool: web}")))
    with Client(ip) as c:
        # pipelining: ten requests in one write, ten responses in order
        c.send(b"".join(build("POST", f"/echo?i={i}", body=b"body") if i == 4 else build("GET", f"/echo?i={i}")
                        for i in range(10)))
        assert [c.response().echo()["target"] for _ in range(10)] == [f"/echo?i={i}" for i in range(10)]

        # keep-alive on both sides: one backend connection serves them all
        for i in range(100):
            assert c.request(path=f"/?n={i}").status == 200
        assert established(origin.pid, 9101) <= 2
    for _ in range(10):  # later client connections reuse the pooled backend connection
        with Client(ip) as c:
            assert c.request(path="/").status == 200
    assert established(origin.pid, 9101) <= 2

    with Client(ip) as c:
        # the backend's own hop-by-hop headers stay with it
        r = c.request(path="/raw/hop")
        assert r.status == 200 and r.body == b"hello" and r.one("x-end") == "1"
        assert not {n for n, _ in r.headers} & {"connection", "keep-alive", "x-hop", "proxy-connection"}, r.head
        # a backend that closes after its answer: the client's connection stays open
        r = c.request(path="/close")
        assert r.status == 200 and r.one("connection") is None, r.head
        assert c.request(path="/").status == 200
        # a pooled connection the backend drops on the next request (conn-0,
        # which served /raw/hop): a GET is retried on a new connection
        r = c.request(path="/raw/flaky")
        assert r.status == 200 and r.body == b"conn-1"
        r = c.request(path="/raw/flaky")
        assert r.status == 200 and r.body == b"conn-2"
        # ... a POST is not: it may have had an effect
        assert c.request("POST", "/raw/flaky", body=b"data").status == 502

    # HTTP/1.0 clients: closed after the response unless they ask for keep-alive
    with Client(ip) as c:
        c.send(b"GET / HTTP/1.0\r\nHost: example.test\r\n\r\n")
        r = c.response()
        assert r.status == 200 and r.one("connection") == "close" and c.closed_within(2)
    with Client(ip) as c:
        for _ in range(2):
            c.send(b"GET /echo HTTP/1.0\r\nHost: example.test\r\nConnection: keep-alive\r\n\r\n")
            r = c.response()
            assert r.status == 200 and r.one("connection") == "keep-alive"
            assert values(r.echo()["headers"], "connection") == []

    # thousands of pipelined requests that lbc answers itself (no route: 404)
    n = 3000
    with Client(ip, timeout=20) as c:
        batch = b"".join(build("GET", f"/missing/{i}", host="nowhere.test") for i in range(n)) + build("GET", "/")
        sender = threading.Thread(target=c.send, args=(batch,))  # lbc stops reading while we do not
        sender.start()
        statuses = [c.response().status for _ in range(n + 1)]
        sender.join(10)
    assert statuses == [404] * n + [200]

"""Session persistence through real nodes (two workers each): signed
cookies, source-IP and header affinity, the Redis store (a real
redis-server), and two nodes sharing one Redis.

Source-IP tests bind their clients to distinct loopback addresses in the
test's own 127.a.b.0/24 (every loopback client is otherwise 127.0.0.1)."""

from __future__ import annotations

import http.client
import json
import socket
import stat
import threading
import time

import pytest
from support.node import LbcNode, get, wait_until

pytestmark = pytest.mark.timeout(240)

CHECK = "{type: http, path: /health, interval: 500ms, timeout: 400ms, healthy_threshold: 1, unhealthy_threshold: 2}"


def port_of(ident: str) -> int:
    return 9100 + ord(ident) - ord("a") + 1


def config(ip: str, sticky: str, ids=("a", "b", "c"), *, port: int = 8080, workers: int = 2, https: str = "",
           tcp_port: int | None = None, check: str = "") -> str:
    backends = "".join(f"      - {{id: {i}, address: {ip}, port: {port_of(i)}}}\n" for i in ids)
    tcp = (f"  - {{name: raw, bind: \"{ip}:{tcp_port}\", protocol: tcp, pool: web}}\n" if tcp_port else "")
    protocol = "https" if https else "http"
    admin = f"admin: {{bind: \"{ip}:{port + 1000}\"}}"  # two nodes at once: two admin ports
    return (f"version: 1\nglobal: {{workers: {workers}, drain_timeout: 2s, {admin}}}\nlisteners:\n"
            f"  - name: web\n    bind: \"{ip}:{port}\"\n    protocol: {protocol}\n{https}    routes: [{{pool: web}}]\n"
            f"{tcp}pools:\n  - name: web\n    sticky: {sticky}\n"
            + (f"    health_check: {check}\n" if check else "") + f"    backends:\n{backends}")


@pytest.fixture
def backends(origins, ip):
    return {i: origins(i, http=[f"{ip}:{port_of(i)}"]) for i in "abcd"}


def cookie_of(headers: dict) -> str | None:
    sc = headers.get("set-cookie")
    return sc.split(";")[0] if sc else None


def echo(ip: str, port: int, headers: dict | None = None, source: str | None = None) -> tuple[int, dict, dict]:
    """GET /echo on a new connection (so from any worker): status, response
    headers, and the backend's JSON (its id, the headers it received)."""
    c = http.client.HTTPConnection(ip, port, timeout=10, source_address=(source, 0) if source else None)
    try:
        c.request("GET", "/echo", headers=headers or {})
        r = c.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(body) if r.status == 200 else {}
    finally:
        c.close()


def cookies_seen(body: dict) -> list[str]:
    """The Cookie lines the backend received."""
    return [value for name, value in body["headers"] if name.lower() == "cookie"]


def served_by(ip: str, port: int, source: str | None = None, headers: dict | None = None) -> str:
    status, _, body = echo(ip, port, headers, source)
    assert status == 200
    return body["id"]


def test_a_cookie_pins_a_client_across_workers_and_the_backend_never_sees_it(node, backends, ip):
    node.up(config(ip, "{mode: cookie, ttl: 10m}"))
    status, headers, body = echo(ip, 8080)
    assert status == 200
    assert headers["set-cookie"].endswith("; Max-Age=600; Path=/; HttpOnly; SameSite=Lax")  # no Secure over http
    cookie = cookie_of(headers)
    pinned = body["id"]
    # 50 requests, each on a new connection (both workers take some), all to one backend; none re-pins
    for _ in range(50):
        status, headers, body = echo(ip, 8080, {"Cookie": f"theme=dark; {cookie}; lang=en"})
        assert (status, body["id"], headers.get("set-cookie")) == (200, pinned, None)
        assert cookies_seen(body) == ["theme=dark; lang=en"]
    # the node's own secret, made at first start, private
    secret = node.state / "node-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes().strip()) == 64
    # a cookie alone is taken out whole: no empty Cookie line reaches the backend
    _, _, body = echo(ip, 8080, {"Cookie": cookie})
    assert cookies_seen(body) == []


def test_tampered_malformed_and_foreign_cookies_are_ignored_and_replaced(node, backends, ip):
    node.up(config(ip, "{mode: cookie}"))
    _, headers, body = echo(ip, 8080)
    name, value = cookie_of(headers).split("=", 1)
    ident, expiry, mac = value.split(".")
    other = next(i for i in "abc" if i != body["id"])
    import base64
    forged = base64.urlsafe_b64encode(other.encode()).rstrip(b"=").decode() + f".{expiry}.{mac}"
    for bad in (forged, value[:-2], "garbage", f"{ident}.{expiry}.{mac}x", f"{ident}.ffffffffff.{mac}"):
        status, headers, _ = echo(ip, 8080, {"Cookie": f"{name}={bad}"})
        assert status == 200 and headers.get("set-cookie", "").startswith(f"{name}="), bad
    # signed by another node's secret: foreign
    other_node = LbcNode(node.dir / "other")
    try:
        other_node.up(config(ip, "{mode: cookie}", port=8081))
        _, headers, _ = echo(ip, 8081)
        status, headers, _ = echo(ip, 8080, {"Cookie": cookie_of(headers)})
        assert headers.get("set-cookie"), "a cookie signed with another secret was accepted"
    finally:
        other_node.cleanup()


def test_the_pinned_backend_killed_moves_the_client_with_a_new_cookie_and_no_5xx(node, backends, ip):
    node.up(config(ip, "{mode: cookie}", check=CHECK))
    assert wait_until(lambda: set(health(node).values()) == {"healthy"}, 10)
    _, headers, body = echo(ip, 8080)
    cookie, pinned = cookie_of(headers), body["id"]
    backends[pinned].stop()
    statuses, seen, cookies = [], [], set()
    deadline = time.monotonic() + 4  # past detection (2 failed checks, 500 ms apart)
    while time.monotonic() < deadline:
        status, headers, body = echo(ip, 8080, {"Cookie": cookie})
        statuses.append(status)
        seen.append(body.get("id"))
        if headers.get("set-cookie"):
            cookie = cookie_of(headers)
            cookies.add(cookie)
        time.sleep(0.02)
    assert set(statuses) == {200}, statuses  # the retry (retries: 1) covers the requests before detection
    assert pinned not in seen
    assert len(set(seen[-20:])) == 1  # re-pinned, and it stays
    assert cookies, "no new cookie after the move"


def test_https_cookies_are_secure_and_a_secret_file_rotates(node, backends, ip, tls_files, tmp_path):
    import ssl

    secrets = tmp_path / "sticky.keys"
    secrets.write_text("old-secret-0123456789abcdef\n")
    tls = f"    tls:\n      certificates:\n        - {{cert: {tls_files['www_cert']}, key: {tls_files['www_key']}}}\n"
    sticky = f"{{mode: cookie, secret_file: {secrets}}}"
    node.up(config(ip, sticky, https=tls))
    ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
    ctx.check_hostname = False  # no SNI to an address: the listener's default certificate answers

    def https_echo(headers=None):
        c = http.client.HTTPSConnection(ip, 8080, timeout=10, context=ctx)
        try:
            c.request("GET", "/echo", headers=headers or {})
            r = c.getresponse()
            return {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())
        finally:
            c.close()

    headers, body = https_echo()
    assert headers["set-cookie"].endswith("; HttpOnly; SameSite=Lax; Secure")
    old_cookie, pinned = cookie_of(headers), body["id"]
    # rotation: a new first secret signs, the old one still verifies
    secrets.write_text("new-secret-0123456789abcdef\nold-secret-0123456789abcdef\n")
    assert node.apply(config(ip, sticky, https=tls)).returncode == 0
    headers, body = https_echo({"Cookie": old_cookie})
    assert (body["id"], headers.get("set-cookie")) == (pinned, None)
    headers, body = https_echo()
    new_cookie, new_pinned = cookie_of(headers), body["id"]
    # the old secret retired: its cookies are foreign now; the new ones still verify
    secrets.write_text("new-secret-0123456789abcdef\n")
    assert node.apply(config(ip, sticky, https=tls)).returncode == 0
    assert https_echo({"Cookie": old_cookie})[0].get("set-cookie")
    headers, body = https_echo({"Cookie": new_cookie})
    assert (body["id"], headers.get("set-cookie")) == (new_pinned, None)
    assert not (node.state / "node-secret").exists()  # with a secret_file the node's own is never made


def health(node) -> dict[str, str]:
    return {b["id"]: b["health"] for b in json.loads(node.lbc("status", "--json").stdout)["backends"]}


def sources(ip: str, n: int) -> list[str]:
    base = ip.rsplit(".", 1)[0]
    return [f"{base}.{10 + i}" for i in range(n)]


def test_source_ip_reaches_one_backend_from_every_worker_over_http_and_tcp(node, backends, ip):
    node.up(config(ip, "{mode: source_ip}", tcp_port=8090))
    clients = sources(ip, 24)
    placed = {}
    for src in clients:
        ids = {served_by(ip, 8080, source=src) for _ in range(6)}  # new connections: both workers
        assert len(ids) == 1, (src, ids)
        placed[src] = ids.pop()
        # the tcp listener shares the pool and the ring: the same backend for the same address
        with socket.create_connection((ip, 8090), timeout=10, source_address=(src, 0)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.endswith(f"{placed[src]}\n".encode()), (src, data[-20:])
    assert len(set(placed.values())) == 3  # spread over all backends

    # removing a backend moves exactly the keys it had: every other client stays (so, on
    # average, 1 - 1/N of them; the exact share depends on where this test's addresses hash)
    assert node.apply(config(ip, "{mode: source_ip}", ids=("a", "b"), tcp_port=8090)).returncode == 0
    after = {src: served_by(ip, 8080, source=src) for src in clients}
    assert {s: after[s] for s in clients if placed[s] != "c"} == {s: placed[s] for s in clients if placed[s] != "c"}
    assert all(after[s] in "ab" for s in clients)


def test_header_affinity_with_a_redis_store_survives_backend_changes(node, backends, ip, redis_server):
    sticky = f"{{mode: header, header: X-User, ttl: 1h, store: \"{redis_server.url}\"}}"
    node.up(config(ip, sticky))
    users = [f"user-{i}" for i in range(30)]
    placed = {u: served_by(ip, 8080, headers={"X-User": u}) for u in users}
    assert len(set(placed.values())) == 3
    for u in users:
        assert redis_server.client.get(f"lbc:sticky:web:{u}") == placed[u].encode()
        assert 3590 <= redis_server.client.ttl(f"lbc:sticky:web:{u}") <= 3600
    assert redis_server.client.dbsize() == len(users)
    # a new backend: the ring alone would move about a quarter of the users to it; the store keeps them all
    assert node.apply(config(ip, sticky, ids=("a", "b", "c", "d"))).returncode == 0
    for _ in range(2):
        assert {u: served_by(ip, 8080, headers={"X-User": u}) for u in users} == placed
    # removing a backend moves only its users, and the store remembers where they went
    assert node.apply(config(ip, sticky, ids=("a", "b", "d"))).returncode == 0
    moved = {u: served_by(ip, 8080, headers={"X-User": u}) for u in users}
    assert all(moved[u] == placed[u] for u in users if placed[u] != "c")
    assert all(redis_server.client.get(f"lbc:sticky:web:{u}") == moved[u].encode() for u in users)
    # without the header: balanced as usual, nothing remembered
    assert served_by(ip, 8080) in "abd" and redis_server.client.dbsize() == len(users)


def load(ip: str, port: int, stop: threading.Event, results: list, user: str) -> None:
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    while not stop.is_set():
        try:
            status, _, body = get(ip, port, "/", headers={"X-User": user}, conn=conn)
            results.append((user, status, body.strip().decode()))
        except (OSError, http.client.HTTPException) as e:
            results.append((user, 0, repr(e)))
            conn.close()
            conn = http.client.HTTPConnection(ip, port, timeout=10)
    conn.close()


def test_redis_killed_mid_run_fails_no_request(node, backends, ip, redis_server):
    node.up(config(ip, f"{{mode: header, header: X-User, store: \"{redis_server.url}\"}}"))
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=load, args=(ip, 8080, stop, results, f"u{i}")) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    before = len(results)
    redis_server.kill()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert before > 50 and len(results) > before + 100, (before, len(results))
    assert [r for r in results if r[1] != 200] == []
    # each user stayed on one backend throughout: the store's first mappings were the ring's picks
    by_user: dict[str, set] = {}
    for user, _, body in results:
        by_user.setdefault(user, set()).add(body)
    assert all(len(ids) == 1 for ids in by_user.values()), by_user


def test_two_nodes_with_one_redis_and_one_secret_keep_a_client_on_one_backend(tmp_path, backends, ip, redis_server):
    secret = tmp_path / "shared.keys"
    secret.write_text("one-secret-for-all-nodes-0123456789\n")
    header = f"{{mode: header, header: X-User, store: \"{redis_server.url}\"}}"
    cookie = f"{{mode: cookie, secret_file: {secret}, store: \"{redis_server.url}\"}}"
    nodes = [LbcNode(tmp_path / name) for name in ("node-a", "node-b")]
    try:
        for n, port in zip(nodes, (8080, 8081), strict=True):
            n.up(config(ip, header, port=port))
        users = [f"user-{i}" for i in range(12)]
        placed = {u: served_by(ip, 8080, headers={"X-User": u}) for u in users}
        # node B (its workers never saw these users) sends them where node A did, alternating
        for _ in range(3):
            for port in (8081, 8080):
                assert {u: served_by(ip, port, headers={"X-User": u}) for u in users} == placed
        # the backend set changes on node B only (a pipeline half way through): the store still agrees
        assert nodes[1].apply(config(ip, header, ids=("a", "b", "c", "d"), port=8081)).returncode == 0
        assert {u: served_by(ip, 8081, headers={"X-User": u}) for u in users} == placed

        # cookies: signed by one node, honoured by the other
        for n, port in zip(nodes, (8080, 8081), strict=True):
            assert n.apply(config(ip, cookie, port=port)).returncode == 0
        _, headers, body = echo(ip, 8080)
        jar, pinned = cookie_of(headers), body["id"]
        for i in range(20):
            status, headers, body = echo(ip, (8080, 8081)[i % 2], {"Cookie": jar})
            assert (status, body["id"], headers.get("set-cookie")) == (200, pinned, None)
    finally:
        for n in nodes:
            n.cleanup()

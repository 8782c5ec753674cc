"""Re-encryption through a real node: a pool's `tls` makes lbc speak TLS to
its backends (origins serving HTTPS or a TLS echo, certificates made by
trustme), verified against `ca_file` and the `sni` name unless the pool
says `verify: false`."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time

import pytest
import trustme
from support.node import get, wait_until

pytestmark = pytest.mark.timeout(180)

NAME = "backend.example.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA and a backend certificate for NAME; a stranger CA's
    certificate for the same name."""
    d = tmp_path_factory.mktemp("reencrypt")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    for label, issuer in (("backend", ca), ("stranger", stranger)):
        cert = issuer.issue_cert(NAME)
        cert.private_key_pem.write_to_path(d / f"{label}.key")
        with open(d / f"{label}.pem", "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
    return d


def config(ip: str, tls: str, *, protocol: str = "http", port: int = 9443) -> str:
    """One listener on ip:8080 in front of pool `secure` (one backend on
    ip:port) whose `tls` is the flow mapping `tls`."""
    route = "routes: [{pool: secure}]" if protocol == "http" else "pool: secure"
    return (f"version: 1\nglobal: {{workers: 1}}\nlisteners:\n"
            f"  - {{name: front, bind: \"{ip}:8080\", protocol: {protocol}, {route}}}\n"
            f"pools:\n  - name: secure\n    tls: {tls}\n"
            f"    backends: [{{id: b1, address: {ip}, port: {port}}}]\n")


def status(node) -> dict:
    return json.loads(node.lbc("status", "--json").stdout)


def health_of(node) -> dict[str, str]:
    return {b["id"]: b["health"] for b in status(node)["backends"]}


def https_origin(origins, ip: str, pki, label: str = "backend"):
    return origins("b1", https=[f"{ip}:9443"], tcps=[f"{ip}:9444"], cert=pki / f"{label}.pem",
                   key=pki / f"{label}.key")


def echo(ip: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    status, _, body = get(ip, 8080, "/echo", conn=conn)
    return status, (json.loads(body) if status == 200 else {})


def test_http_listener_to_a_tls_pool_verifies_and_pools_connections(node, origins, ip, pki):
    https_origin(origins, ip, pki)
    node.up(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}"))
    status, seen = echo(ip)
    assert status == 200
    assert seen["tls"]["server_name"] == NAME and seen["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-proto"] == "http" and headers["host"] == f"{ip}:8080"
    # Keep-alive to the backend over TLS: many requests (on one client
    # connection, then each on its own), few backend connections.
    numbers = set()
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    for _ in range(100):
        status, seen = echo(ip, conn)
        assert status == 200
        numbers.add(seen["connection"])
    conn.close()
    for _ in range(100):
        status, seen = echo(ip)
        assert status == 200
        numbers.add(seen["connection"])
    assert len(numbers) <= 2, numbers


def test_bodies_streams_and_upgrades_over_a_tls_pool(node, origins, ip, pki):
    https_origin(origins, ip, pki)
    node.up(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}"))
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    body = bytes(range(256)) * 4096  # 1 MiB up
    conn.request("POST", "/echo", body=body)
    r = conn.getresponse()
    seen = json.loads(r.read())
    assert r.status == 200 and seen["body_len"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    conn.request("GET", "/stream?n=5000000")  # 5 MB down, chunked
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200 and len(data) == 5_000_000 and data[:256] == bytes(range(256))
    conn.close()
    with socket.create_connection((ip, 8080), timeout=10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(4096)
        head, _, got = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        payload = bytes(range(256)) * 1024
        s.sendall(payload)
        while len(got) < len(payload):
            got += s.recv(65536)
        assert got == payload


def test_without_sni_the_backend_address_is_the_name_verified(node, origins, ip, pki, tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    cert = ca.issue_cert(ip)  # an IP address SAN
    cert.private_key_pem.write_to_path(tmp_path / "ip.key")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "ip.pem")
    origins("b1", https=[f"{ip}:9443"], cert=tmp_path / "ip.pem", key=tmp_path / "ip.key")
    node.up(config(ip, f"{{ca_file: {tmp_path / 'ca.pem'}}}"))
    status, seen = echo(ip)
    assert status == 200 and seen["tls"]["server_name"] is None  # no SNI is sent for an IP address


def test_a_backend_named_by_host_name_is_verified_by_that_name(node, origins, ip, tmp_path):
    """Without `sni` the name sent and verified is the backend's address as
    written: a host name, not the address it resolves to."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(tmp_path / "localhost.key")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "localhost.pem")
    origins("b1", https=["127.0.0.1:29763"], tcps=["127.0.0.1:29764"], cert=tmp_path / "localhost.pem",
            key=tmp_path / "localhost.key")
    text = config(ip, f"{{ca_file: {tmp_path / 'ca.pem'}}}").replace(f"address: {ip}, port: 9443",
                                                                       "address: localhost, port: 29763")
    node.up(text)
    status, seen = wait_until(lambda: (r := echo(ip))[0] != 503 and r, 10)  # once the checker resolved it
    assert status == 200 and seen["tls"]["server_name"] == "localhost"
    node.apply(text.replace("protocol: http, routes: [{pool: secure}]", "protocol: tcp, pool: secure")
               .replace("port: 29763", "port: 29764"))

    def echoed() -> bytes:
        with socket.create_connection((ip, 8080), timeout=5) as s:
            s.sendall(b"hello")
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""  # not resolved yet: closed at once

    assert wait_until(echoed, 10) == b"hello"


@pytest.mark.parametrize("case", ["untrusted CA", "another name", "system trust store"])
def test_a_certificate_that_does_not_verify_gives_502_unless_verify_is_off(node, origins, ip, pki, case):
    label, tls = {
        "untrusted CA": ("stranger", f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}"),
        "another name": ("backend", f"{{ca_file: {pki / 'ca.pem'}, sni: other.example.test}}"),
        "system trust store": ("backend", f"{{sni: {NAME}}}"),
    }[case]
    https_origin(origins, ip, pki, label)
    node.up(config(ip, tls))
    for _ in range(3):
        assert echo(ip)[0] == 502
    assert node.apply(config(ip, tls[:-1] + ", verify: false}")).returncode == 0
    status, seen = echo(ip)
    assert status == 200 and seen["tls"]["server_name"] in (NAME, "other.example.test")


def test_a_reload_that_changes_the_pools_tls_settings_opens_new_backend_connections(node, origins, ip, pki):
    """Pooled connections survive a reload, but not one that changes what
    they were verified with: tightening `verify` takes effect at once."""
    https_origin(origins, ip, pki, "stranger")
    loose = f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}, verify: false}}"
    node.up(config(ip, loose))
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    first = echo(ip, conn)[1]["connection"]
    assert node.apply(config(ip, loose).replace("    tls:", "    drain_timeout: 7s\n    tls:")).returncode == 0
    assert echo(ip, conn)[1]["connection"] == first  # an unrelated change: the same backend connection
    assert node.apply(config(ip, loose.replace(NAME, "other.example.test"))).returncode == 0
    status, seen = echo(ip, conn)
    assert status == 200 and seen["connection"] != first and seen["tls"]["server_name"] == "other.example.test"
    assert node.apply(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}")).returncode == 0
    assert [echo(ip, conn)[0] for _ in range(3)] == [502] * 3  # the stranger's certificate no longer passes
    conn.close()


@pytest.mark.parametrize("kind", ["http", "tcp"])
def test_health_checks_of_a_tls_pool_speak_tls_and_verify(node, origins, ip, pki, kind):
    """Probes connect as the workers do: over TLS, verified the same way; a
    backend whose certificate fails verification fails its checks too."""
    https_origin(origins, ip, pki)
    path = ", path: /health" if kind == "http" else ""
    check = f"{{type: {kind}{path}, interval: 500ms, timeout: 400ms, healthy_threshold: 1, unhealthy_threshold: 1}}"

    def checked(tls: str) -> str:
        return config(ip, tls).replace("    tls:", f"    health_check: {check}\n    tls:")

    node.up(checked(f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}"))
    assert wait_until(lambda: health_of(node) == {"b1": "healthy"}, 10), status(node)
    assert echo(ip)[0] == 200
    assert node.apply(checked(f"{{ca_file: {pki / 'ca.pem'}, sni: other.example.test}}")).returncode == 0
    assert wait_until(lambda: health_of(node) == {"b1": "unhealthy"}, 10), status(node)
    error = {b["id"]: b for b in status(node)["backends"]}["b1"]["error"]
    assert error.startswith("TLS: ") and "other.example.test" in error, error


def test_tcp_listener_to_a_tls_pool(node, origins, ip, pki):
    https_origin(origins, ip, pki)
    node.up(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}", protocol="tcp", port=9444))
    with socket.create_connection((ip, 8080), timeout=5) as s:
        for i in range(20):
            piece = b"%d:" % i + bytes(range(256)) * 40
            s.sendall(piece)
            got = b""
            while len(got) < len(piece):
                chunk = s.recv(65536)
                assert chunk, "closed early"
                got += chunk
            assert got == piece
    # HTTP bytes through the tcp listener to the HTTPS origin
    node.apply(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}", protocol="tcp", port=9443))
    status, seen = echo(ip)
    assert status == 200 and seen["tls"]["server_name"] == NAME
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert "x-forwarded-proto" not in headers  # bytes passed through as they are
    # a backend that does not verify: the client connection is closed, nothing else
    node.apply(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: other.example.test}}", protocol="tcp", port=9444))
    with socket.create_connection((ip, 8080), timeout=5) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b""


def test_tcp_client_half_close_over_a_tls_pool(node, origins, ip, pki):
    """TLS in asyncio has no half-close: a client's EOF cannot be passed on
    as one. The backend still gets the bytes and its answer still reaches
    the client."""
    https_origin(origins, ip, pki)
    node.up(config(ip, f"{{ca_file: {pki / 'ca.pem'}, sni: {NAME}}}", protocol="tcp", port=9443))
    with socket.create_connection((ip, 8080), timeout=5) as s:
        s.sendall(f"GET /slow?s=1&n=5 HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        time.sleep(0.3)  # the backend connection is open by now; the answer comes 1 s later
        s.shutdown(socket.SHUT_WR)
        data = b""
        start = time.monotonic()
        while chunk := s.recv(65536):
            data += chunk
        assert time.monotonic() - start < 5
    assert data.startswith(b"HTTP/1.1 200"), data[:200]

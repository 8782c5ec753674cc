"""tls_passthrough through a real node: TLS goes to the backends untouched,
routed by the SNI name of the ClientHello.

Two TLS echo backends (tests/support/tls_echo.py), A and B, each with its
own certificate for its own name. A client that asks for a.example.test
completes its handshake with A's certificate (the very bytes A serves: lbc
terminated nothing) and A saw the same SNI name; TLS's Finished messages
cover the whole ClientHello, so a handshake that completes proves it
arrived unchanged. Unknown names and hellos without a name go to the
default (the listener's pool, or a route without match), or are closed
when there is none. Broken ClientHellos and a slowloris are closed without
any backend seeing a connection.
"""

from __future__ import annotations

import random
import socket
import ssl
import time

import pytest
import trustme
from support import hellos
from support.tls_echo import TlsEcho

pytestmark = pytest.mark.timeout(120)

ROUTED, STRICT, FALLBACK = 8443, 8444, 8445  # listener ports


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    for name, hosts in (("a", ["a.example.test"]), ("b", ["b.example.test", "*.b.example.test"])):
        cert = ca.issue_cert(*hosts)
        cert.private_key_pem.write_to_path(d / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(d / f"{name}.pem")
    return d


@pytest.fixture
def backends(ip, pki):
    """A on 9101 and B on 9102."""
    started = {}
    try:
        for name, port in (("a", 9101), ("b", 9102)):
            started[name] = TlsEcho(ip, port, pki / f"{name}.pem", pki / f"{name}.key")
        yield started
    finally:
        for server in started.values():
            server.stop()


def config(ip: str, *, header: str = "10s", weights: tuple[int, int] = (1, 1)) -> str:
    """Three passthrough listeners: ROUTED (routes to a and b, the listener's
    pool a as the default), STRICT (routes only: no default), FALLBACK (a
    route without match to an ip_hash pool over both)."""
    timeouts = f"timeouts: {{client_header: {header}}}"
    return f"""\
version: 1
global: {{workers: 1, drain_timeout: 5s}}
listeners:
  - name: routed
    bind: "{ip}:{ROUTED}"
    protocol: tls_passthrough
    {timeouts}
    pool: a
    routes:
      - {{match: {{host: a.example.test}}, pool: a}}
      - {{match: {{host: b.example.test}}, pool: b}}
      - {{match: {{host: "*.b.example.test"}}, pool: b}}
  - name: strict
    bind: "{ip}:{STRICT}"
    protocol: tls_passthrough
    {timeouts}
    routes:
      - {{match: {{host: a.example.test}}, pool: a}}
      - {{match: {{host: B.Example.Test.}}, pool: b}}
  - name: fallback
    bind: "{ip}:{FALLBACK}"
    protocol: tls_passthrough
    {timeouts}
    routes:
      - {{match: {{host: a.example.test}}, pool: a}}
      - {{pool: both}}
pools:
  - name: a
    backends: [{{id: a-1, address: {ip}, port: 9101, weight: {weights[0]}}}]
  - name: b
    backends: [{{id: b-1, address: {ip}, port: 9102, weight: {weights[1]}}}]
  - name: both
    algorithm: ip_hash
    backends:
      - {{id: both-a, address: {ip}, port: 9101}}
      - {{id: both-b, address: {ip}, port: 9102}}
"""


def verifying(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def trusting(pki) -> ssl.SSLContext:
    """Verifies the chain, not the name: for names no certificate has."""
    ctx = verifying(pki)
    ctx.check_hostname = False
    return ctx


def connect(ip: str, port: int, ctx: ssl.SSLContext, name: str | None, source: str | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection((ip, port), timeout=10, source_address=(source, 0) if source else None)
    return ctx.wrap_socket(raw, server_hostname=name)


def owner(sock: ssl.SSLSocket, pki) -> str:
    """Which backend's certificate the client got, compared byte for byte."""
    der = sock.getpeercert(binary_form=True)
    for name in ("a", "b"):
        if der == ssl.PEM_cert_to_DER_cert((pki / f"{name}.pem").read_text()):
            return name
    raise AssertionError("a certificate no backend has")


def echo(sock: ssl.SSLSocket, data: bytes) -> bytes:
    """Send `data` in pieces, reading each one back."""
    out = bytearray()
    for i in range(0, len(data), 65536):
        piece = data[i : i + 65536]
        sock.sendall(piece)
        want = len(out) + len(piece)
        while len(out) < want:
            got = sock.recv(want - len(out))
            assert got, "closed"
            out += got
    return bytes(out)


def counts(backends) -> dict[str, int]:
    return {name: b.accepted for name, b in backends.items()}


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the proxy closes `sock` (EOF or reset), None if it stays open."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return time.monotonic() - start
    except ConnectionError:
        return time.monotonic() - start
    except TimeoutError:
        return None


def test_sni_picks_the_backend_whose_own_certificate_the_client_verifies(node, backends, ip, pki):
    node.up(config(ip))
    for name, expected in (("a.example.test", "a"), ("b.example.test", "b"), ("x.b.example.test", "b"),
                           ("A.EXAMPLE.TEST", "a")):
        before = counts(backends)
        with connect(ip, ROUTED, verifying(pki), name) as sock:  # chain and name verified
            assert owner(sock, pki) == expected
            assert echo(sock, b"hello " + name.encode()) == b"hello " + name.encode()
        assert backends[expected].names[-1] == name  # the backend saw the client's own SNI
        after = counts(backends)
        assert after[expected] == before[expected] + 1 and sum(after.values()) == sum(before.values()) + 1
    # many bytes both ways, byte-exact, inside the backend's TLS session
    data = random.Random(5).randbytes(4 << 20)
    with connect(ip, ROUTED, verifying(pki), "b.example.test") as sock:
        assert echo(sock, data) == data
        assert sock.version() in ("TLSv1.2", "TLSv1.3")


def test_names_without_a_route_go_to_the_default_pool(node, backends, ip, pki):
    node.up(config(ip))
    for name in ("nobody.example.test", "127.0.0.1", None):  # Python sends no SNI for an address
        with connect(ip, ROUTED, trusting(pki), name) as sock:
            assert owner(sock, pki) == "a"
            assert echo(sock, b"x") == b"x"
    assert backends["a"].names == ["nobody.example.test", None, None]
    assert backends["b"].accepted == 0


def test_a_route_without_match_is_the_default_and_hashes_on_the_client_address(node, backends, ip, pki):
    node.up(config(ip))
    with connect(ip, FALLBACK, verifying(pki), "a.example.test") as sock:
        assert owner(sock, pki) == "a"
    prefix = ip.rsplit(".", 1)[0]
    for n in range(2, 6):
        seen = set()
        for _ in range(4):
            with connect(ip, FALLBACK, trusting(pki), "nobody.example.test", source=f"{prefix}.{n}") as sock:
                seen.add(owner(sock, pki))
                assert echo(sock, b"y") == b"y"
        assert len(seen) == 1, (n, seen)  # ip_hash: one source, one backend


def test_no_default_pool_closes_unknown_names_and_hellos_without_one(node, backends, ip, pki):
    node.up(config(ip))
    with connect(ip, STRICT, verifying(pki), "b.example.test") as sock:  # the route's host was B.Example.Test.
        assert owner(sock, pki) == "b"
    before = counts(backends)
    for name in ("nobody.example.test", None):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connect(ip, STRICT, trusting(pki), name)
    time.sleep(0.2)
    assert counts(backends) == before


def broken_hellos() -> dict[str, bytes]:
    good = hellos.capture("a.example.test")
    built = hellos.build(b"a.example.test")
    return {
        "http": b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n",
        "ssh": b"SSH-2.0-OpenSSH_9.6\r\n",
        "sslv2": bytes.fromhex("8046010301002d0000001000"),
        "alert first": bytes.fromhex("15030100020228") + good,
        "server hello": good[:5] + b"\x02" + good[6:],
        "record of 16 KiB": good[:3] + b"\x40\x00" + good[5:],
        "handshake of 16 KiB": good[:3] + b"\x00\x04" + b"\x01\x00\x40\x00",
        "empty record": good[:3] + b"\x00\x00",
        "session id length": built.with_length("session id", 1),
        "host name length": built.with_length("host name", -1),
        "empty sni": hellos.build(b"").data,
        "two names": hellos.build(server_names=[(0, b"a.example.test"), (0, b"b.example.test")]).data,
        "bad host name": hellos.build(b"a.exa\x00ple.test").data,
        "no sni without default": hellos.capture(None),  # to the STRICT listener, which has no default
    }


def test_broken_client_hellos_are_closed_without_touching_a_backend(node, backends, ip):
    node.up(config(ip))
    for label, data in broken_hellos().items():
        with socket.create_connection((ip, STRICT if "default" in label else ROUTED), timeout=10) as sock:
            sock.sendall(data)
            assert closed_within(sock, 5) is not None, f"{label}: still open"
    # cut short: the client closes after part of a good hello
    good = hellos.capture("a.example.test")
    for cut in (1, 5, 6, 9, len(good) // 2, len(good) - 1):
        with socket.create_connection((ip, ROUTED), timeout=10) as sock:
            sock.sendall(good[:cut])
            sock.shutdown(socket.SHUT_WR)
            assert closed_within(sock, 5) is not None, f"cut at {cut}: still open"
    time.sleep(0.3)
    assert counts(backends) == {"a": 0, "b": 0}


def test_a_client_hello_split_into_many_records_and_packets_is_routed(node, backends, ip, pki):
    """The client's ClientHello re-cut into records of 1 to 60 bytes, sent in
    small packets: B gets it as sent, and the handshake completes."""
    node.up(config(ip))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = verifying(pki).wrap_bio(incoming, outgoing, server_hostname="b.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    rng = random.Random(1)
    records = hellos.records(outgoing.read()[5:], [rng.randint(1, 60) for _ in range(50)])
    with socket.create_connection((ip, ROUTED), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for j in range(0, len(records), 97):
            sock.sendall(records[j : j + 97])
            time.sleep(0.002)
        while True:
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
        sock.sendall(outgoing.read())
        assert tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert((pki / "b.pem").read_text())
    assert backends["b"].names == ["b.example.test"] and backends["a"].accepted == 0


def test_slowloris_is_closed_after_the_client_header_timeout(node, backends, ip):
    node.up(config(ip, header="1s"))
    with socket.create_connection((ip, ROUTED), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01")
        waited = closed_within(sock, 5)
    assert waited is not None and 0.5 <= waited < 3, waited  # the sweep runs twice a second
    assert counts(backends) == {"a": 0, "b": 0}


def test_a_passthrough_connection_survives_an_apply(node, backends, ip, pki):
    node.up(config(ip))
    with connect(ip, ROUTED, verifying(pki), "a.example.test") as sock:
        assert echo(sock, b"before") == b"before"
        applied = node.apply(config(ip, weights=(2, 3)))
        assert applied.returncode == 0, applied.stderr
        assert echo(sock, b"after") == b"after"
    with connect(ip, ROUTED, verifying(pki), "b.example.test") as sock:
        assert owner(sock, pki) == "b"

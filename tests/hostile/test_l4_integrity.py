"""Scorecard rows 8 and 9: L4 integrity through lbc with product defaults
(2 workers), beside the http listener of tests/hostile/lb.py.

Row 8: a tcp listener; 20 connections at once each send 10 MB of random
bytes to the origin's TCP echo (tests/support/origin.py) and read it back:
the sha256 of what came back is the sha256 of what was sent, plus the
origin's b"bye\\n", which it sends only once it has seen the client's EOF.
Every client shuts down its write side while echo is still on its way
(half-close: it stops reading HOLD bytes short of the end until it has
shut down): it must still get the rest, the b"bye\\n" and then EOF.

Row 9: a udp listener; 1,000 datagrams from 4 client addresses, at most 32
unanswered at a time (the default receive buffer, about 212 KB, holds that
many with room to spare), every one answered byte for byte; then the
sessions time out idle (idle: 1s): the backends' active counts go to 0, and
each client's next datagram opens a new session (the backend's session
count, `requests` in lbc status, goes up by one per client).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import lb
import pytest
from support.node import wait_until

pytestmark = pytest.mark.timeout(90)

L4_PORT = 7000  # the tcp/udp listener; echo origins on 9201, 9202 of the test's address
CONNECTIONS = 20
SIZE = 10_000_000
CHUNK = 256 * 1024
HOLD = 512 * 1024  # echo a client leaves unread until it has shut down writing


def l4_config(ip: str, protocol: str, idle: str = "") -> str:
    """lb.config() plus a `protocol` listener `echo` on IP:7000 to pool echo."""
    timeouts = f"\n    timeouts: {{idle: {idle}}}" if idle else ""
    listeners = f"""\
  - name: echo
    bind: "{ip}:{L4_PORT}"
    protocol: {protocol}
    pool: echo{timeouts}
"""
    pools = f"""\
  - name: echo
    backends:
      - {{id: echo-1, address: {ip}, port: 9201}}
      - {{id: echo-2, address: {ip}, port: 9202}}
"""
    return lb.config(ip, listeners=listeners, pools=pools)


@pytest.fixture
def echo(origins, ip):
    """echo-1 and echo-2: each a TCP and a UDP echo on 9201/9202, plus the
    http origins lb.config() names."""
    lb.web_origins(origins, ip)
    return [origins(f"echo-{i}", tcp=[f"{ip}:{9200 + i}"], udp=[f"{ip}:{9200 + i}"]) for i in (1, 2)]


def backends(node) -> dict[str, dict]:
    return {b["id"]: b for b in json.loads(node.lbc("status", "--json").stdout)["backends"]}


# -- row 8 -------------------------------------------------------------------------------


def one_connection(ip: str, seed: int) -> dict:
    """Send SIZE random bytes (from a thread), shut down writing, read until
    EOF; the sha256 and length of each direction, and how much echo arrived
    after the shutdown (the reader waits for it HOLD bytes short of the end,
    so the path holds at least that much echo when the client half-closes)."""
    rng = random.Random(seed)
    sent = hashlib.sha256()
    shut_at_received = [0]
    shut = threading.Event()
    error: list[BaseException] = []
    received = [0]

    with socket.create_connection((ip, L4_PORT), timeout=30) as sock:

        def send() -> None:
            try:
                left = SIZE
                while left:
                    piece = rng.randbytes(min(CHUNK, left))
                    sock.sendall(piece)
                    sent.update(piece)
                    left -= len(piece)
                shut_at_received[0] = received[0]
                sock.shutdown(socket.SHUT_WR)
            except BaseException as e:  # noqa: BLE001 - raised by the test below
                error.append(e)
            finally:
                shut.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = hashlib.sha256()
        tail = b""
        while True:
            short = SIZE - HOLD - received[0]
            if short <= 0:
                assert shut.wait(30), "the sender could not finish while HOLD bytes of echo were unread"
            data = sock.recv(CHUNK if short <= 0 else min(CHUNK, short))
            if not data:
                break
            got.update(data)
            received[0] += len(data)
            tail = (tail + data)[-4:]
        sender.join(30)
        assert not sender.is_alive() and not error, error
    expected = sent.copy()
    expected.update(b"bye\n")
    return {"expected": (expected.hexdigest(), SIZE + 4), "got": (got.hexdigest(), received[0]),
            "tail": tail, "after_shutdown": received[0] - shut_at_received[0]}


@pytest.mark.row("8")
def test_tcp_10mb_random_both_ways_over_20_connections_with_half_close(node, echo, ip, figure):
    node.up(l4_config(ip, "tcp"))
    start = time.monotonic()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        results = list(pool.map(lambda i: one_connection(ip, seed=os.getpid() * 100 + i), range(CONNECTIONS)))
    elapsed = time.monotonic() - start
    for i, r in enumerate(results):
        assert r["got"] == r["expected"], f"connection {i}: {r['got'][1]} bytes back, {r['expected'][1]} expected"
        assert r["tail"] == b"bye\n"  # the backend saw the client's EOF, and its last word came through
    # half-close honoured: after its shutdown(SHUT_WR) each client still got echo (and then EOF)
    late = sorted(r["after_shutdown"] for r in results)
    assert late[0] >= HOLD + 4, late
    # every connection was counted, spread over both backends
    counted = wait_until(lambda: (b := backends(node)) and b["echo-1"]["requests"] + b["echo-2"]["requests"]
                         == CONNECTIONS and b, 3)
    assert counted and counted["echo-1"]["requests"] and counted["echo-2"]["requests"], backends(node)
    mb = CONNECTIONS * SIZE / 1e6
    figure(f"{CONNECTIONS} x 10 MB random each way byte-exact (sha256) in {elapsed:.1f}s "
           f"({2 * mb / elapsed:.0f} MB/s through the proxy); half-close: every client got "
           f">= {late[0] / 1e3:.0f} KB of echo + bye + EOF after its SHUT_WR")


# -- row 9 -------------------------------------------------------------------------------

DATAGRAMS = 1000
CLIENTS = 4
WINDOW = 32  # unanswered datagrams at most, over all clients


def source(ip: str, n: int) -> str:
    """Another address of this test's 127.a.b.0/24 (the listener is .1)."""
    return ip.rsplit(".", 1)[0] + f".{n}"


def udp_clients(ip: str) -> list[socket.socket]:
    out = []
    for n in range(CLIENTS):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source(ip, 2 + n), 0))
        s.connect((ip, L4_PORT))  # the kernel drops datagrams from anyone but the listener
        s.setblocking(False)
        out.append(s)
    return out


def exchange(clients: list[socket.socket], count: int, window: int, timeout: float = 10) -> tuple[int, set[bytes]]:
    """`count` numbered random datagrams (16..1400 bytes) round the clients,
    at most `window` unanswered; every answer checked byte for byte.
    Returns (answered, the backends that answered)."""
    rng = random.Random(count)
    payloads = [b"%06d|" % i + rng.randbytes(rng.randrange(10, 1394)) for i in range(count)]
    owner = {i: clients[i % len(clients)] for i in range(count)}
    answered: set[int] = set()
    by: set[bytes] = set()
    sent = 0
    with selectors.DefaultSelector() as sel:
        for s in clients:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(answered) < count and time.monotonic() < deadline:
            while sent < count and sent - len(answered) < window:
                owner[sent].send(payloads[sent])
                sent += 1
            for key, _ in sel.select(0.5):
                while True:
                    try:
                        data = key.fileobj.recv(65536)
                    except BlockingIOError:
                        break
                    backend, _, payload = data.partition(b":")
                    seq = int(payload[:6])
                    assert payload == payloads[seq] and owner[seq] is key.fileobj, f"datagram {seq} mangled"
                    assert seq not in answered, f"datagram {seq} answered twice"
                    answered.add(seq)
                    by.add(backend)
    return len(answered), by


@pytest.mark.row("9")
def test_udp_1000_datagrams_echoed_and_sessions_time_out_idle(node, echo, ip, figure):
    node.up(l4_config(ip, "udp", idle="1s"))
    clients = udp_clients(ip)
    try:
        start = time.monotonic()
        answered, by = exchange(clients, DATAGRAMS, WINDOW)
        last = time.monotonic()
        elapsed = last - start
        assert answered == DATAGRAMS, f"{answered}/{DATAGRAMS} answered"
        assert by == {b"echo-1", b"echo-2"}  # 4 sessions, spread over both
        before = backends(node)
        assert before["echo-1"]["requests"] + before["echo-2"]["requests"] == CLIENTS  # one session per client
        # idle past 1 s: the workers' sweep (twice a second) ends every session
        assert wait_until(lambda: all(b["active"] == 0 for b in backends(node).values()), 5), backends(node)
        ended_after = time.monotonic() - last
        assert ended_after >= 0.9
        # and each client's next datagram opens a new session
        answered, _ = exchange(clients, CLIENTS, WINDOW)
        assert answered == CLIENTS
        after = wait_until(lambda: (b := backends(node)) and b["echo-1"]["requests"] + b["echo-2"]["requests"]
                           == 2 * CLIENTS and b, 3)
        assert after, backends(node)
    finally:
        for s in clients:
            s.close()
    figure(f"{DATAGRAMS}/{DATAGRAMS} datagrams echoed byte-exact (<= {WINDOW} in flight, {CLIENTS} clients) "
           f"in {elapsed:.2f}s; sessions gone within {ended_after:.1f}s of the last datagram (idle 1s, swept twice a second), "
           f"next datagrams open new sessions")

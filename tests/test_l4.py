"""L4 through a real node: TCP and UDP listeners end to end.

TCP: bytes both ways byte-exact, connections spread by the pool's
algorithm, half-close, backpressure towards a client that stops reading,
the idle timeout of a stalled pair. UDP: sessions per client address,
replies from the listener's own address, round robin per session, idle
timeout. Applies: TCP connections and UDP sessions survive a change of
weights; on a removed backend or listener they drain, then close.
Flow control measured: 256 MiB each way through an HTTP and a TCP listener
to a client reading at 16 MiB/s, with the worker's RSS sampled during the
transfer; a slow reader leaves its pooled backend connection usable.
Every test talks only to its own 127.a.b.* addresses.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from support.node import wait_until

pytestmark = pytest.mark.timeout(120)

PORT = 7000  # the listener's port; backends are on 9101 and 9102 of the same address
MiB = 1 << 20


def l4_config(ip: str, protocol: str = "tcp", *, workers: int = 1, weights=(1, 1), algorithm: str = "round_robin",
              idle: str | None = None, backends=(1, 2), port: int = PORT, drain: str = "5s") -> str:
    """One tcp (or udp) listener on `port` for pool echo: backends echo-N on 9100+N."""
    timeouts = f", timeouts: {{idle: {idle}}}" if idle else ""
    return "\n".join([
        "version: 1",
        f"global: {{workers: {workers}, drain_timeout: {drain}}}",
        "listeners:",
        f"  - {{name: echo-{port}, bind: \"{ip}:{port}\", protocol: {protocol}, pool: echo{timeouts}}}",
        "pools:",
        "  - name: echo",
        f"    algorithm: {algorithm}",
        "    backends:",
        *(f"      - {{id: echo-{i}, address: {ip}, port: {9100 + i}, weight: {weights[i - 1]}}}" for i in backends),
    ]) + "\n"


def http_config(ip: str) -> str:
    return "\n".join([
        "version: 1",
        "global: {workers: 1, drain_timeout: 5s}",
        f"listeners: [{{name: web, bind: \"{ip}:{PORT}\", routes: [{{pool: web}}]}}]",
        "pools:",
        "  - name: web",
        f"    backends: [{{id: web-1, address: {ip}, port: 9101}}]",
    ]) + "\n"


@pytest.fixture
def echo(origins, ip):
    """Two origins, echo-1 and echo-2, each a TCP and a UDP echo on 9101/9102."""
    return [origins(f"echo-{i}", tcp=[f"{ip}:{9100 + i}"], udp=[f"{ip}:{9100 + i}"]) for i in (1, 2)]


def source(ip: str, n: int) -> str:
    """Another address of this test's own 127.a.b.0/24 (the listener is .1)."""
    return ip.rsplit(".", 1)[0] + f".{n}"


# -- helpers: TCP clients ---------------------------------------------------------------


class Sender(threading.Thread):
    """Send `size` bytes of a seeded pseudo-random stream on `sock` (as fast
    as the other side accepts, or at `rate` bytes/s), then shut down writing.
    Keeps the sha256 of what it sent; an error is kept for the test to raise."""

    def __init__(self, sock: socket.socket, size: int, seed: int, *, rate: float | None = None,
                 chunk: int = MiB, shutdown: bool = True) -> None:
        super().__init__(daemon=True)
        self.sock, self.size, self.rate, self.chunk, self.shutdown = sock, size, rate, chunk, shutdown
        self.rng = random.Random(seed)
        self.sha = hashlib.sha256()
        self.sent = 0
        self.error: BaseException | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            start = time.monotonic()
            while self.sent < self.size:
                piece = self.rng.randbytes(min(self.chunk, self.size - self.sent))
                if self.rate:
                    ahead = self.sent / self.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                self.sock.sendall(piece)
                self.sha.update(piece)
                self.sent += len(piece)
            if self.shutdown:
                self.sock.shutdown(socket.SHUT_WR)
            self.finished_at = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def result(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"sender still running after {timeout}s ({self.sent} bytes sent)"
        if self.error is not None:
            raise self.error


def expected_echo(sender: Sender) -> tuple[str, int]:
    """What the origin's TCP echo returns: the bytes, then b"bye\\n" after EOF."""
    sha = sender.sha.copy()
    sha.update(b"bye\n")
    return sha.hexdigest(), sender.sent + 4


def receive_all(sock: socket.socket, rate: float | None = None, on_data=None) -> tuple[str, int, bytes]:
    """Read until EOF (at most `rate` bytes/s when given): sha256, length, last bytes."""
    sha = hashlib.sha256()
    got = 0
    tail = b""
    start = time.monotonic()
    while True:
        if rate:
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        data = sock.recv(256 * 1024)
        if not data:
            return sha.hexdigest(), got, tail
        sha.update(data)
        got += len(data)
        tail = (tail + data)[-16:]
        if on_data is not None:
            on_data(data)


def tcp_echo(host: str, size: int, seed: int, timeout: float = 60) -> tuple[tuple[str, int], tuple[str, int]]:
    """One connection: send `size` bytes and read the echo until EOF."""
    with socket.create_connection((host, PORT), timeout=timeout) as sock:
        sender = Sender(sock, size, seed)
        sender.start()
        sha, got, _ = receive_all(sock)
        sender.result(timeout)
        return expected_echo(sender), (sha, got)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    out = b""
    while len(out) < len(data):
        piece = sock.recv(len(data) - len(out))
        assert piece, "connection closed"
        out += piece
    return out


def established(origin, port: int) -> int:
    """TCP connections the origin process holds on its listening `port`."""
    return sum(1 for c in psutil.Process(origin.pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def backend_counters(node) -> dict[str, dict]:
    return {b["id"]: b for b in json.loads(node.lbc("status", "--json").stdout)["backends"]}


class RssSampler(threading.Thread):
    """Sample a process's RSS every 20 ms; `growth` is the max seen minus the
    value before sampling started."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)

    def finish(self) -> int:
        self.stop.set()
        self.join(5)
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.before

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


# -- TCP ---------------------------------------------------------------------------------


def test_tcp_bytes_both_ways_over_parallel_connections(node, echo, ip):
    """20 connections at once, 10 MB of random bytes each way on each:
    byte-exact, and round robin puts 10 on each backend."""
    node.up(l4_config(ip))
    size = 10_000_000
    start = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: tcp_echo(ip, size, seed=i), range(20)))
    elapsed = time.monotonic() - start
    for i, (expected, got) in enumerate(results):
        assert got == expected, f"connection {i}: {got[1]} bytes received, {expected[1]} expected"
    counted = wait_until(lambda: [backend_counters(node)[b]["requests"] for b in ("echo-1", "echo-2")] == [10, 10], 3)
    assert counted, backend_counters(node)
    print(f"20 x 10 MB each way in {elapsed:.2f}s ({2 * 20 * size / elapsed / 1e6:.0f} MB/s through the proxy)")


def test_tcp_round_robin_alternates_backends_per_connection(node, echo, ip):
    node.up(l4_config(ip))
    socks = []
    try:
        order = []
        for i in range(8):
            before = [established(o, 9101 + n) for n, o in enumerate(echo)]
            s = socket.create_connection((ip, PORT), timeout=10)
            socks.append(s)
            assert roundtrip(s, b"hello %d" % i) == b"hello %d" % i  # the backend connection is up
            after = [established(o, 9101 + n) for n, o in enumerate(echo)]
            gained = [n for n in range(2) if after[n] == before[n] + 1]
            assert len(gained) == 1 and sum(after) == sum(before) + 1, (before, after)
            order.append(f"echo-{gained[0] + 1}")
        assert order == ["echo-1", "echo-2"] * 4
        counters = wait_until(lambda: (c := backend_counters(node)) and c["echo-1"]["active"] == 4
                              and c["echo-2"]["active"] == 4 and c, 3)
        assert counters, backend_counters(node)
    finally:
        for s in socks:
            s.close()
    # closing the clients closes the backend connections and frees the counts
    assert wait_until(lambda: sum(established(o, 9101 + n) for n, o in enumerate(echo)) == 0, 5)
    assert wait_until(lambda: all(b["active"] == 0 for b in backend_counters(node).values()), 3)


def test_tcp_half_close_still_receives_everything(node, echo, ip):
    """The client sends 10 MB and shuts down writing; it still gets the whole
    echo and the b"bye\\n" the backend sends after seeing the EOF, then EOF."""
    node.up(l4_config(ip, backends=(1,)))
    with socket.create_connection((ip, PORT), timeout=30) as sock:
        sender = Sender(sock, 10_000_000, seed=7)
        sender.start()
        sha, got, tail = receive_all(sock, rate=40 * MiB)  # slower than the sender: echo is still due at its EOF
        sender.result(30)
        assert (sha, got) == expected_echo(sender)
        assert tail.endswith(b"bye\n")
        # the write side was shut down well before the last of the echo arrived
        assert sender.finished_at and time.monotonic() - sender.finished_at > 0.05


def test_tcp_half_close_with_nothing_sent(node, echo, ip):
    node.up(l4_config(ip, backends=(1,)))
    with socket.create_connection((ip, PORT), timeout=10) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert receive_all(sock)[2] == b"bye\n"


def test_tcp_client_that_stops_reading_does_not_grow_the_worker(node, echo, ip):
    """A client sends as fast as it can and reads nothing: the proxy stops
    reading from it once the buffers along the path are full (the worker's
    RSS stays flat); once the client reads again, everything arrives."""
    node.up(l4_config(ip, backends=(1,)))
    worker = node.worker_pids()[0]
    sock = socket.create_connection((ip, PORT), timeout=30)
    try:
        rng = random.Random(3)
        sha = hashlib.sha256()
        sent = 0
        cap = 512 * MiB
        piece = rng.randbytes(MiB)
        with RssSampler(worker) as rss:
            sock.setblocking(False)
            last_progress = time.monotonic()
            while sent < cap and time.monotonic() - last_progress < 1.5:
                try:
                    n = sock.send(piece)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                sha.update(piece[:n])
                sent += n
                piece = piece[n:] or rng.randbytes(MiB)
                last_progress = time.monotonic()
            stalled_at = sent
            time.sleep(1)  # stalled: the worker holds still
            growth = rss.finish()
        print(f"stalled after {stalled_at / MiB:.1f} MiB sent; worker RSS grew {growth / MiB:.1f} MiB")
        assert stalled_at < 200 * MiB, "the path never pushed back"
        assert growth < 16 * MiB
        # reading again drains everything, byte-exact
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_WR)
        got_sha, got, tail = receive_all(sock)
        sha.update(b"bye\n")
        assert (got_sha, got) == (sha.hexdigest(), sent + 4)
    finally:
        sock.close()


def test_tcp_idle_timeout_ends_a_stalled_connection(node, echo, ip):
    """A client that fills every buffer and never reads is idle: after the
    listener's idle timeout (1 s) the worker lets go of both connections,
    although neither can flush what it holds (close() would wait forever)."""
    node.up(l4_config(ip, backends=(1,), idle="1s"))
    sock = socket.create_connection((ip, PORT), timeout=10)
    try:
        sock.setblocking(False)
        piece = random.Random(1).randbytes(MiB)
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < 0.5:
            try:
                sock.send(piece)
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        assert established(echo[0], 9101) == 1
        assert wait_until(lambda: established(echo[0], 9101) == 0, 5), "the backend connection is still open"
        assert wait_until(lambda: backend_counters(node)["echo-1"]["active"] == 0, 3)
        status = json.loads(node.lbc("status", "--json").stdout)
        assert status["running"]
    finally:
        sock.close()


def test_tcp_connection_survives_an_apply(node, echo, ip):
    """Connections opened before `lbc apply` of a table with changed weights
    keep working (one idle, one in the middle of a transfer) and are not closed."""
    node.up(l4_config(ip, algorithm="weighted_round_robin"))
    worker = node.worker_pids()[0]
    idle = socket.create_connection((ip, PORT), timeout=30)
    busy = socket.create_connection((ip, PORT), timeout=30)
    try:
        assert roundtrip(idle, b"before") == b"before"
        sender = Sender(busy, 48 * MiB, seed=11, rate=16 * MiB)  # about 3 s
        sender.start()
        received: dict = {}
        reader = threading.Thread(target=lambda: received.update(r=receive_all(busy)), daemon=True)
        reader.start()
        time.sleep(1)
        applied = node.apply(l4_config(ip, algorithm="weighted_round_robin", weights=(3, 1)))
        assert applied.returncode == 0, applied.stderr
        assert node.worker_pids()[0] == worker  # no process replaced
        assert roundtrip(idle, b"after") == b"after"
        sender.result(30)
        reader.join(30)
        assert "r" in received, "transfer did not finish"
        assert received["r"][:2] == expected_echo(sender)
        idle.shutdown(socket.SHUT_WR)
        assert receive_all(idle)[2] == b"bye\n"
    finally:
        idle.close()
        busy.close()
    # and new connections follow the new weights: 3:1
    picks = []
    for _ in range(8):
        before = [established(o, 9101 + n) for n, o in enumerate(echo)]
        with socket.create_connection((ip, PORT), timeout=10) as s:
            assert roundtrip(s, b"x") == b"x"
            after = [established(o, 9101 + n) for n, o in enumerate(echo)]
            picks.append(next(n + 1 for n in range(2) if after[n] > before[n]))
            s.shutdown(socket.SHUT_WR)
            receive_all(s)
        wait_until(lambda: sum(established(o, 9101 + n) for n, o in enumerate(echo)) == 0, 5)
    assert picks.count(1) == 6 and picks.count(2) == 2, picks


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the proxy closes `sock` (EOF or reset), None if it stays open."""
    start = time.monotonic()
    sock.settimeout(0.05)
    try:
        while time.monotonic() - start < timeout:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - start
            if not data:
                return time.monotonic() - start
        return None
    finally:
        sock.settimeout(10)


def test_tcp_connection_to_a_removed_backend_drains_then_closes(node, echo, ip):
    """A backend removed by an apply gets no new connections; those it has
    keep working until the drain timeout (1 s here), then are closed."""
    node.up(l4_config(ip, drain="1s"))
    with socket.create_connection((ip, PORT), timeout=10) as old:
        assert roundtrip(old, b"on echo-1") == b"on echo-1"
        assert established(echo[0], 9101) == 1
        applied = node.apply(l4_config(ip, drain="1s", backends=(2,)))
        assert applied.returncode == 0, applied.stderr
        start = time.monotonic()
        assert roundtrip(old, b"still") == b"still"
        with socket.create_connection((ip, PORT), timeout=10) as new:
            assert roundtrip(new, b"x") == b"x"
            assert established(echo[1], 9102) == 1
            closed = wait_closed(old, 5)
            assert closed is not None, "the drained connection was never closed"
            assert time.monotonic() - start >= 0.9
            assert roundtrip(new, b"y") == b"y"  # the kept backend's connection is untouched
    assert wait_until(lambda: established(echo[0], 9101) == 0, 3)


def test_tcp_connection_on_a_removed_listener_drains_then_closes(node, echo, ip):
    node.up(l4_config(ip, drain="1s"))
    with socket.create_connection((ip, PORT), timeout=10) as old:
        assert roundtrip(old, b"before") == b"before"
        applied = node.apply(l4_config(ip, drain="1s", port=PORT + 1))
        assert applied.returncode == 0, applied.stderr
        start = time.monotonic()
        with pytest.raises(OSError):
            socket.create_connection((ip, PORT), timeout=2)
        assert roundtrip(old, b"after") == b"after"  # still served
        with socket.create_connection((ip, PORT + 1), timeout=10) as new:
            assert roundtrip(new, b"x") == b"x"
        closed = wait_closed(old, 5)
        assert closed is not None, "the connection on the removed listener was never closed"
        assert time.monotonic() - start >= 0.9


# -- UDP ---------------------------------------------------------------------------------


def udp_client(src: str, ip: str) -> socket.socket:
    """A connect()ed socket: the kernel drops datagrams from any address
    other than the listener's."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.connect((ip, PORT))
    s.settimeout(3)
    return s


def udp_exchange(sock: socket.socket, count: int, window: int = 32, size: int = 200) -> set[bytes]:
    """Send `count` numbered datagrams, at most `window` unanswered at a time;
    check every echo byte for byte; return the backends that answered."""
    rng = random.Random(count)
    payloads = [b"%06d|" % i + rng.randbytes(size) for i in range(count)]
    answered: dict[int, bytes] = {}
    sent = 0
    while len(answered) < count:
        while sent < count and sent - len(answered) < window:
            sock.send(payloads[sent])
            sent += 1
        data = sock.recv(65536)
        backend, _, payload = data.partition(b":")
        seq = int(payload[:6])
        assert payload == payloads[seq] and seq not in answered
        answered[seq] = backend
    return set(answered.values())


def test_udp_session_echoes_from_the_listener_address(node, echo, ip):
    node.up(l4_config(ip, "udp"))
    client = udp_client(source(ip, 2), ip)
    try:
        assert udp_exchange(client, 1000) == {b"echo-1"}  # one session, one backend
    finally:
        client.close()
    # an unconnected socket sees where replies come from: the listener's address
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        other.bind((source(ip, 3), 0))
        other.settimeout(3)
        other.sendto(b"where", (ip, PORT))
        data, addr = other.recvfrom(2048)
        assert data == b"echo-2:where" and addr == (ip, PORT)
    finally:
        other.close()


def test_udp_sessions_per_client_address_round_robin(node, echo, ip):
    node.up(l4_config(ip, "udp"))
    clients = [udp_client(source(ip, n), ip) for n in (2, 3, 4, 5)]
    try:
        first = [udp_exchange(c, 1) for c in clients]
        assert first == [{b"echo-1"}, {b"echo-2"}, {b"echo-1"}, {b"echo-2"}]
        # each address keeps its session (and backend), in any interleaving
        for _ in range(3):
            for c, backends in zip(clients, first, strict=True):
                assert udp_exchange(c, 20) == backends
        counters = wait_until(lambda: (c := backend_counters(node)) and c["echo-1"]["active"] == 2 and c, 3)
        assert counters and counters["echo-2"]["active"] == 2
        assert counters["echo-1"]["requests"] == 2 and counters["echo-2"]["requests"] == 2  # 4 sessions
    finally:
        for c in clients:
            c.close()


def test_udp_session_ends_after_idle_timeout(node, echo, ip):
    node.up(l4_config(ip, "udp", idle="1s"))
    client = udp_client(source(ip, 2), ip)
    try:
        assert udp_exchange(client, 1) == {b"echo-1"}
        # traffic keeps the session: 2.5 s of datagrams 0.4 s apart stay on echo-1
        for _ in range(6):
            time.sleep(0.4)
            assert udp_exchange(client, 1) == {b"echo-1"}
        # idle longer than 1 s: the sweep ends the session
        assert wait_until(lambda: backend_counters(node)["echo-1"]["active"] == 0, 5)
        assert udp_exchange(client, 1) == {b"echo-2"}  # a new session, the next backend
        assert udp_exchange(client, 10) == {b"echo-2"}
    finally:
        client.close()


def test_udp_session_survives_an_apply(node, echo, ip):
    """An apply while sessions are open (it used to crash the worker's
    reload): the session keeps its backend and its datagrams flow on."""
    node.up(l4_config(ip, "udp", algorithm="weighted_round_robin"))
    worker = node.worker_pids()[0]
    client = udp_client(source(ip, 2), ip)
    try:
        assert udp_exchange(client, 10) == {b"echo-1"}
        applied = node.apply(l4_config(ip, "udp", algorithm="weighted_round_robin", weights=(1, 3)))
        assert applied.returncode == 0, applied.stderr
        assert node.worker_pids()[0] == worker
        assert udp_exchange(client, 200) == {b"echo-1"}
    finally:
        client.close()


def test_udp_session_to_a_removed_backend_drains_then_moves(node, echo, ip):
    """A session keeps its backend across an apply that removes it, until the
    drain timeout (1 s) ends the session; the next datagram opens one on a
    backend of the new table."""
    node.up(l4_config(ip, "udp", drain="1s", idle="30s"))
    client = udp_client(source(ip, 2), ip)
    try:
        assert udp_exchange(client, 1) == {b"echo-1"}
        applied = node.apply(l4_config(ip, "udp", drain="1s", idle="30s", backends=(2,)))
        assert applied.returncode == 0, applied.stderr
        start = time.monotonic()
        seen = []
        while time.monotonic() - start < 5 and b"echo-2" not in seen:
            try:
                seen.append(udp_exchange(client, 1).pop())
            except TimeoutError:
                seen.append(b"lost")  # the one datagram in flight when the session is cut
            time.sleep(0.1)
        moved_after = time.monotonic() - start
        assert seen[0] == b"echo-1" and seen[-1] == b"echo-2", seen
        assert seen.count(b"lost") <= 1, seen
        assert moved_after >= 0.9
        assert udp_exchange(client, 100) == {b"echo-2"}
    finally:
        client.close()


# -- flow control, measured --------------------------------------------------------------

TOTAL = 256 * MiB
READ_RATE = 16 * MiB  # bytes per second the client reads
RSS_LIMIT = 32 * 10**6


class ChunkedBody:
    """The test's own incremental decoder of a chunked response body."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.left = 0
        self.crlf = False  # a chunk's data ended: its CRLF is due
        self.done = False
        self.sha = hashlib.sha256()
        self.length = 0

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while not self.done:
            if self.left:
                take = min(self.left, len(buf))
                if not take:
                    return
                self.sha.update(buf[:take])
                del buf[:take]
                self.left -= take
                self.length += take
                if self.left:
                    return
                self.crlf = True
            if self.crlf:
                if len(buf) < 2:
                    return
                assert buf[:2] == b"\r\n", bytes(buf[:20])
                del buf[:2]
                self.crlf = False
            end = buf.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            if size == 0:
                if buf.find(b"\r\n\r\n", end) == end:
                    self.done = True
                return
            del buf[: end + 2]
            self.left = size


def transfer(node, sock: socket.socket, head: bytes, on_data, shutdown: bool) -> dict:
    """Send `head` then TOTAL bytes as fast as the proxy accepts (then shut
    down writing when asked) while reading at READ_RATE until EOF, sampling
    the worker's RSS throughout."""
    worker = node.worker_pids()[0]
    time.sleep(0.2)
    with RssSampler(worker) as rss:
        start = time.monotonic()
        sock.sendall(head)
        sender = Sender(sock, TOTAL, seed=5, shutdown=shutdown)
        sender.start()
        sha, got, tail = receive_all(sock, rate=READ_RATE, on_data=on_data)
        elapsed = time.monotonic() - start
        sender.result(30)
        growth = rss.finish()
    return {"sender": sender, "sha": sha, "got": got, "tail": tail, "elapsed": elapsed, "growth": growth,
            "sent_in": sender.finished_at - start}


def slow_get(ip: str, path: str, rate: float, timeout: float = 5) -> int:
    """GET `path` on a new connection, reading the chunked body at `rate`
    bytes/s; returns the body's length."""
    with socket.create_connection((ip, PORT), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            piece = s.recv(65536)
            assert piece, head
            head += piece
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        body = ChunkedBody()
        body.feed(rest)
        start = time.monotonic()
        got = 0
        while not body.done:
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            piece = s.recv(65536)
            assert piece, f"closed after {body.length} bytes"
            got += len(piece)
            body.feed(piece)
        return body.length


def test_flow_control_slow_reader_leaves_the_backend_connection_usable(node, origins, ip):
    """A response to a slow reader ends while reading from the backend is
    paused for it; the backend connection goes back to the pool and must read
    again, or the next request on it never gets its response."""
    origin = origins("web-1", http=[f"{ip}:9101"])
    node.up(http_config(ip))
    for i in range(6):
        assert slow_get(ip, f"/stream?n={8 * MiB}", rate=16 * MiB) == 8 * MiB, f"request {i}"
    assert established(origin, 9101) == 1  # one pooled connection served them all


@pytest.mark.timeout(90)
def test_flow_control_http_body_256mib_each_way(node, origins, ip):
    origins("web-1", http=[f"{ip}:9101"])
    node.up(http_config(ip))
    body = ChunkedBody()
    head = bytearray()

    def on_data(data: bytes) -> None:
        if body.buf or head.endswith(b"\r\n\r\n"):
            body.feed(data)
            return
        head.extend(data)
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            rest = bytes(head[end + 4:])
            del head[end + 4:]
            body.feed(rest)

    request = (f"POST /mirror HTTP/1.1\r\nHost: {ip}\r\nContent-Length: {TOTAL}\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
    with socket.create_connection((ip, PORT), timeout=30) as sock:
        r = transfer(node, sock, request, on_data, shutdown=False)  # the proxy closes after the response
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), bytes(head)
    assert body.done and body.length == TOTAL
    assert body.sha.hexdigest() == r["sender"].sha.hexdigest()
    print(f"HTTP: 256 MiB each way in {r['elapsed']:.1f}s ({TOTAL / r['elapsed'] / MiB:.1f} MiB/s read), "
          f"upload done after {r['sent_in']:.1f}s; worker RSS grew {r['growth'] / 1e6:.1f} MB")
    assert r["growth"] < RSS_LIMIT
    assert r["elapsed"] < 2 * TOTAL / READ_RATE


@pytest.mark.timeout(90)
def test_flow_control_tcp_256mib_each_way(node, echo, ip):
    node.up(l4_config(ip, backends=(1,)))
    with socket.create_connection((ip, PORT), timeout=30) as sock:
        r = transfer(node, sock, b"", None, shutdown=True)
    assert (r["sha"], r["got"]) == expected_echo(r["sender"])
    print(f"TCP: 256 MiB each way in {r['elapsed']:.1f}s ({TOTAL / r['elapsed'] / MiB:.1f} MiB/s read), "
          f"upload done after {r['sent_in']:.1f}s; worker RSS grew {r['growth'] / 1e6:.1f} MB")
    assert r["growth"] < RSS_LIMIT
    assert r["elapsed"] < 2 * TOTAL / READ_RATE

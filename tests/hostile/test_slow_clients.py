"""Scorecard rows 3, 4 and 5: slow clients (slowhttptest's slowloris, slow
body and slow read) against lbc with product defaults (tests/hostile/lb.py),
and the client_body timeout that closes stalled request bodies.

During each attack a probe thread opens a fresh connection from the test's
own address every 0.5 s and GETs / (counting failures and the worst
latency), a sampler counts the attack connections the workers hold (and
their RSS) once a second, and slowhttptest's own CSV (-g -o PREFIX: per
second closed, pending, connected, service available) is read at the end.
slowhttptest cannot choose its source address: its connections come from
127.0.0.1 (the kernel's choice) to the test's 127.a.b.1, which is the only
address it talks to.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from lb import HTTP_PORT, config, web_origins
from support.client import Client, build

SLOWHTTPTEST = shutil.which("slowhttptest") or "/usr/bin/slowhttptest"
PROBE_EVERY = 0.5
RSS_GUARD = 1500 * 2**20  # a runaway worker would take the machine down: stop the attack beyond this
PAGE = os.sysconf("SC_PAGE_SIZE")


def tcp_mem_pages() -> int:
    """The machine's TCP socket memory now (pages, /proc/net/sockstat)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    return 0


TCP_MEM_PRESSURE, TCP_MEM_MAX = (int(v) for v in Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1:])  # pages


@pytest.fixture
def front(node, origins, ip):
    web_origins(origins, ip)
    node.up(config(ip))
    return ip


# -- measuring an attack ------------------------------------------------------------------


@dataclass
class Watch:
    """Probes and samples while an attack runs (two threads, stopped by stop())."""

    ip: str
    node: object
    probes: int = 0
    failures: list = field(default_factory=list)
    worst: float = 0.0
    samples: list = field(default_factory=list)  # (t, client conns held, backend conns, rss, workers' cpu s, tcp mem pages)
    slow: list = field(default_factory=list)  # probes that took over a second: (t, seconds)
    t0: float = 0.0

    def __post_init__(self) -> None:
        self.done = threading.Event()
        self.pids = list(self.node.worker_pids().values())
        self.threads = [threading.Thread(target=self._probe, daemon=True),
                        threading.Thread(target=self._sample, daemon=True)]

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(15)
        self.samples.append((time.monotonic() - self.t0, *self.held()))

    def _probe(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            try:
                c = http.client.HTTPConnection(self.ip, HTTP_PORT, timeout=5, source_address=(self.ip, 0))
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status != 200:
                    self.failures.append(f"{start - self.t0:.1f}s: {r.status}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{start - self.t0:.1f}s: {e!r}")
            took = time.monotonic() - start
            self.probes += 1
            if took > 1:
                self.slow.append((round(start - self.t0, 1), round(took, 2)))
            self.worst = max(self.worst, took)
            self.done.wait(max(0.0, PROBE_EVERY - took))

    def _sample(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic() - self.t0, *self.held()))
            self.done.wait(1.0)

    def held(self) -> tuple[int, int, int, float, int]:
        """(client connections on the listener, backend connections, RSS
        bytes, CPU seconds) summed over the workers, and the machine's TCP
        memory (pages)."""
        clients = backends = rss = 0
        cpu = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                rss += p.memory_info().rss
                times = p.cpu_times()
                cpu += times.user + times.system
                for c in p.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        continue
                    if c.laddr and c.laddr.port == HTTP_PORT and c.laddr.ip == self.ip:
                        clients += 1
                    elif c.raddr and c.raddr.ip == self.ip and c.raddr.port in (9101, 9102):
                        backends += 1
        return clients, backends, rss, cpu, tcp_mem_pages()

    def rss_peak(self) -> int:
        return max((s[3] for s in self.samples), default=0)

    def cpu(self) -> float:
        """CPU seconds the workers spent while watched."""
        return self.samples[-1][4] - self.samples[0][4] if self.samples else 0.0

    def available(self) -> str:
        slow = f", {len(self.slow)} over 1 s" if self.slow else ""
        return f"available {self.probes - len(self.failures)}/{self.probes} probes (worst {self.worst * 1000:.0f} ms{slow})"


@dataclass
class Attack:
    cmd: list[str]
    seconds: float  # how long slowhttptest ran
    rows: list[dict]  # slowhttptest's CSV, one per second
    output: str
    watch: Watch

    def csv_unavailable(self) -> list[int]:
        return [int(r["Seconds"]) for r in self.rows if int(r["Service Available"]) == 0]

    def opened(self) -> int:
        last = self.rows[-1]
        return int(last["Closed"]) + int(last["Pending"]) + int(last["Connected"])

    def csv_all_closed_at(self) -> int | None:
        """The first second from which slowhttptest saw none of its
        connections open (None: some were open to the end). When the last
        one closes it stops at once ("No open connections left") without a
        row for that second."""
        for r in self.rows:
            if int(r["Seconds"]) > 0 and int(r["Pending"]) + int(r["Connected"]) == 0 and int(r["Closed"]) > 0:
                return int(r["Seconds"])
        if "No open connections left" in self.output:
            return int(self.rows[-1]["Seconds"]) + 1
        return None

    def held_max(self) -> int:
        return max((s[1] for s in self.watch.samples), default=0)

    def lbc_all_closed_at(self) -> float | None:
        """The first sample (once a second, and one as slowhttptest ended)
        from which the workers held no attack connection; None if they
        still held some at the end."""
        at = None
        for t, clients, *_ in self.watch.samples:
            if clients:
                at = None
            elif at is None:
                at = t
        return at


def attack(ip: str, node, tmp_path: Path, name: str, args: list[str], limit: float,
           on_sample=None) -> Attack:
    """Run slowhttptest with `args` against lbc, watching it; `on_sample`
    (Watch) may stop the attack early by returning a reason."""
    assert os.access(SLOWHTTPTEST, os.X_OK), "slowhttptest is not installed (Debian's slowhttptest)"
    prefix = tmp_path / name
    cmd = [SLOWHTTPTEST, *args, "-g", "-o", str(prefix)]
    watch = Watch(ip, node)
    out = (tmp_path / f"{name}.out").open("w+")
    watch.start()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    reason = None
    try:
        while proc.poll() is None and time.monotonic() - start < limit:
            time.sleep(0.5)
            if on_sample is not None and (reason := on_sample(watch)):
                break
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        seconds = time.monotonic() - start
        watch.stop()
    out.seek(0)
    output = out.read()
    out.close()
    assert reason is None, reason
    csv_path = prefix.with_suffix(".csv")
    assert csv_path.exists(), f"no CSV from slowhttptest:\n{output[-2000:]}"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert rows, output[-2000:]
    return Attack(cmd=["slowhttptest", *args], seconds=seconds, rows=rows, output=output, watch=watch)


def access_log_count(node, status: int) -> int:
    """Responses with `status` in the workers' access logs (combined format)."""
    needle = f'" {status} '
    total = 0
    for f in (node.state / "run").glob("access-*.log"):
        total += sum(1 for line in f.read_text(errors="replace").splitlines() if needle in line)
    return total


# -- row 3: slowloris ----------------------------------------------------------------------


def all_closed(run, answered: int, figure, label: str) -> None:
    """Rows 3 and 4: record the figure, then check that the service stayed
    available and every attack connection was closed before the attack's end."""
    closed_at = run.csv_all_closed_at()
    lbc_closed = run.lbc_all_closed_at()
    figure(f"{label}: {run.watch.available()}, slowhttptest unavailable in {len(run.csv_unavailable())}/"
           f"{len(run.rows)} seconds; {run.opened()} attack connections (lbc held at most {run.held_max()}) all "
           f"closed by {closed_at} s (CSV; lbc side by {lbc_closed and f'{lbc_closed:.1f}'} s), {answered} answered 408")
    assert run.watch.failures == [], (run.watch.failures, run.watch.slow)
    assert run.csv_unavailable() == [], (run.csv_unavailable(), run.watch.slow)
    assert run.opened() >= 990, run.output[-2000:]
    assert closed_at is not None and closed_at < 40, run.rows


@pytest.mark.row("3")
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slowloris(front, node, tmp_path, figure):
    ip = front
    run = attack(ip, node, tmp_path, "slowloris",
                 ["-H", "-c", "1000", "-r", "200", "-i", "10", "-l", "40", "-u", f"http://{ip}:{HTTP_PORT}/"],
                 limit=70)
    all_closed(run, access_log_count(node, 408), figure, f"`{' '.join(run.cmd)}`")


# -- row 4: slow body ---------------------------------------------------------------------


@pytest.mark.row("4")
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_slow_body(front, node, tmp_path, figure):
    ip = front
    # 1,000 held requests are 2,000 sockets, all on one worker if SO_REUSEPORT so chose:
    # supervisord's minfds (lbc up: the hard limit, up to 65536) must allow them.
    nofile = min(psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0] for pid in node.worker_pids().values())
    assert nofile > 2100, nofile
    args = ["-B", "-c", "1000", "-r", "200", "-i", "10", "-l", "40", "-s", "8192", "-u", f"http://{ip}:{HTTP_PORT}/echo"]
    run = attack(ip, node, tmp_path, "slow-body", args, limit=70)
    held_at_end = run.watch.samples[-2][1]  # the last sample while slowhttptest ran (-1: once it stopped)
    figure(f"`{' '.join(run.cmd)}`, defaults (client_body 60 s): {run.watch.available()}, slowhttptest "
           f"unavailable in {len(run.csv_unavailable())}/{len(run.rows)} seconds; held: lbc at most {run.held_max()} "
           f"client and {max((s[2] for s in run.watch.samples), default=0)} backend connections, {held_at_end} "
           f"still held at {run.watch.samples[-2][0]:.0f} s of {run.seconds:.0f} s (as HAProxy; workers' open-file "
           f"limit {nofile})")
    assert run.watch.failures == [], (run.watch.failures, run.watch.slow)
    assert run.csv_unavailable() == [], (run.csv_unavailable(), run.watch.slow)
    assert run.opened() >= 990, run.output[-2000:]

    # The bonus: client_body 5 s, applied as a reload; slowhttptest's 10 s gaps run past it.
    result = node.apply(config(ip, listener="timeouts: {client_body: 5s}"))
    assert result.returncode == 0, result.stdout + result.stderr
    before = access_log_count(node, 408)
    run = attack(ip, node, tmp_path, "slow-body-5s", args, limit=70)
    all_closed(run, access_log_count(node, 408) - before, figure, "with `timeouts: {client_body: 5s}`")


# -- row 5: slow read ---------------------------------------------------------------------

# Bytes per response, three per connection (-k 3): 3 MiB a connection, 1.5 GiB in all
# were it buffered. The kernel takes the first ~1.5 MB of each into the client
# socket's send buffer (autotuned up to tcp_wmem's 4 MB, counted with overhead),
# the worker may hold its write buffer's high-water mark plus one read (~320 KiB),
# and the rest must wait in the backend: every connection tests the worker's flow
# control. Larger responses add only kernel memory (backend sockets' buffers):
# 20 MB ones took the machine's TCP memory to tcp_mem's limit, which stalls every
# TCP connection on the machine; a guard stops the attack short of it.
STREAM = 1 << 20


@pytest.mark.row("5")
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slow_read(front, node, tmp_path, figure):
    ip = front
    for _ in range(4):  # warm: both workers have served and pooled
        with Client(ip) as c:
            assert c.request(path="/stream?n=100000").status == 200
    time.sleep(1)
    rss_before = Watch(ip, node).held()[2]

    tcp_before = tcp_mem_pages()

    def guard(watch: Watch) -> str | None:
        if watch.samples and watch.samples[-1][3] - rss_before > RSS_GUARD:
            return f"workers' RSS grew by more than {RSS_GUARD >> 20} MB: stopped the attack"
        if watch.samples and watch.samples[-1][5] > 0.9 * TCP_MEM_MAX:
            return f"the machine's TCP memory reached 90% of tcp_mem's limit ({TCP_MEM_MAX} pages): stopped the attack"
        return None

    run = attack(ip, node, tmp_path, "slow-read",
                 ["-X", "-c", "500", "-r", "200", "-l", "40", "-k", "3", "-w", "512", "-y", "1024", "-n", "5",
                  "-z", "32", "-u", f"http://{ip}:{HTTP_PORT}/stream?n={STREAM}"],
                 limit=70, on_sample=guard)
    growth = run.watch.rss_peak() - rss_before
    tcp_peak = max(s[5] for s in run.watch.samples)
    backends = max((s[2] for s in run.watch.samples), default=0)
    figure(f"`{' '.join(run.cmd)}` (each connection pipelines 3 requests for {STREAM >> 10} KiB, advertises a "
           f"512-1024 byte window and reads 32 bytes every 5 s): {run.watch.available()}, slowhttptest "
           f"unavailable in {len(run.csv_unavailable())}/{len(run.rows)} seconds; lbc held at most "
           f"{run.held_max()} client and {backends} backend connections; workers' RSS {rss_before / 2**20:.0f} MB "
           f"before, peak {run.watch.rss_peak() / 2**20:.0f} MB (+{growth / 2**20:.0f} MB); workers' CPU "
           f"{run.watch.cpu():.1f} s; the kernel's TCP memory (machine-wide) +{(tcp_peak - tcp_before) * PAGE / 2**20:.0f} MB "
           f"at its peak (tcp_mem pressure at {TCP_MEM_PRESSURE * PAGE / 2**20:.0f} MB)")
    print("slow probes:", run.watch.slow, "failures:", run.watch.failures)
    assert run.watch.failures == [], (run.watch.failures, run.watch.slow)
    assert run.csv_unavailable() == [], (run.csv_unavailable(), run.watch.slow)
    assert run.held_max() >= 450, run.watch.samples
    assert growth < 200 * 2**20, growth


# -- client_body: what row 4's bonus rests on (quick: runs in `make test` too) -------------


@pytest.mark.row("4")
@pytest.mark.timeout(60)
def test_client_body_timeout_closes_stalled_bodies_only(node, origins, ip, figure):
    web_origins(origins, ip)
    node.up(config(ip, listener="timeouts: {client_body: 2s}"))
    results: dict = {}

    def stalled(name: str, data: bytes) -> None:
        """Send a head and part of a body, then nothing: 408 and closed."""
        with Client(ip, timeout=8) as c:
            c.send(data)
            start = time.monotonic()
            r = c.response()
            results[name] = (r.status, r.one("connection"), c.closed_within(1), time.monotonic() - start)

    def mirrored() -> None:
        """A stalled body whose response already began (/mirror streams it
        back): no 408 can follow, the connection is closed."""
        with Client(ip, timeout=8) as c:
            c.send(build("POST", "/mirror", {"Content-Length": "100"}) + b"m" * 10)
            status, _ = c.head()
            start = time.monotonic()
            got = b""
            while True:
                try:
                    c.fill()
                except (EOFError, ConnectionResetError):
                    break
            got = c.buf
            results["mirror"] = (status, got, time.monotonic() - start)

    def abandoned() -> None:
        """Part of a body, then the client's EOF: the body can never be
        finished, so it is not held to client_body (400 at once)."""
        with Client(ip, timeout=8) as c:
            c.send(build("POST", "/echo", {"Content-Length": "100"}) + b"a" * 10)
            time.sleep(0.2)
            c.sock.shutdown(socket.SHUT_WR)
            start = time.monotonic()
            r = c.response()
            results["abandoned"] = (r.status, r.one("connection"), c.closed_within(1), time.monotonic() - start)

    threads = [
        threading.Thread(target=abandoned),
        threading.Thread(target=stalled, args=("length", build("POST", "/echo", {"Content-Length": "100"}) + b"b" * 10)),
        threading.Thread(target=stalled, args=("chunked", build("POST", "/echo", {"Transfer-Encoding": "chunked"})
                                               + b"64\r\n" + b"c" * 10)),
        threading.Thread(target=mirrored),
    ]
    for t in threads:
        t.start()
    # A body trickled a byte every 0.5 s (6 s in all, 3 times client_body) is never cut off.
    with Client(ip, timeout=8) as c:
        c.send(build("POST", "/echo", {"Content-Length": "12"}))
        for _ in range(12):
            time.sleep(0.5)
            c.send(b"t")
        r = c.response()
        trickled = (r.status, r.echo()["body_len"] if r.status == 200 else None)
        assert c.request(path="/").status == 200  # and the connection stays usable
    for t in threads:
        t.join(15)
    length, chunked, mirror, abandoned_ = results["length"], results["chunked"], results["mirror"], results["abandoned"]
    figure(f"client_body 2s: a stalled body got {length[0]} (Connection: {length[1]}) and was closed at "
           f"{length[3]:.1f} s (chunked: {chunked[0]} at {chunked[3]:.1f} s), a stalled /mirror upload was cut at "
           f"{mirror[2]:.1f} s, one abandoned (EOF) got {abandoned_[0]} at {abandoned_[3]:.1f} s; a body "
           f"trickled a byte per 0.5 s for 6 s got {trickled[0]}")
    for got in (length, chunked):
        assert got[:3] == (408, "close", True), got
        assert 1.5 < got[3] < 4, got  # 2 s since the last body read (on the worker's cached clock), plus the sweep (x2 slack)
    assert mirror[0] == 200 and 1.5 < mirror[2] < 4, mirror
    assert abandoned_[:3] == (400, "close", True) and abandoned_[3] < 1, abandoned_
    assert trickled == (200, 12), trickled


@pytest.mark.row("5")
@pytest.mark.timeout(60)
def test_clients_that_do_not_read_are_cut_without_blaming_the_backend(node, origins, ip, figure):
    """Clients that stop reading a large response: the worker stops reading
    from their backend (flow control) and cuts them after the response
    timeout, and that is not a backend failure (it was: each counted one,
    and outlier_detection ejects a backend after 5 consecutive ones)."""
    web_origins(origins, ip, backends=1)
    node.up(config(ip, backends=1, listener="timeouts: {response: 2s}"))
    rss_before = Watch(ip, node).held()[2]
    clients = []
    for _ in range(6):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.bind((ip, 0))
        s.connect((ip, HTTP_PORT))
        s.sendall(build("GET", "/stream?n=50000000"))
        clients.append(s)
    start = time.monotonic()
    time.sleep(1.5)
    rss_held = Watch(ip, node).held()[2]
    time.sleep(3)  # past the response timeout (2 s) and a sweep
    cut = []
    for s in clients:  # now read what reached us: it must end (reset or EOF), not go on
        with s:
            got = 0
            try:
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            cut.append((round(time.monotonic() - start, 1), got))
    status = json.loads(node.lbc("status", "--json").stdout)
    failures = {b["id"]: b["failures"] for b in status["backends"]}
    with Client(ip) as c:
        after = c.request(path="/").status
    figure(f"6 clients not reading 50 MB responses (response: 2s): cut (all read to their end {max(t for t, _ in cut):.1f} s "
           f"after the requests, {max(g for _, g in cut) / 2**20:.1f} MB at most); workers' RSS +{(rss_held - rss_before) / 2**20:.1f} MB "
           f"while held; backend failures {failures}, next request {after}")
    assert all(g < 10 * 2**20 for _, g in cut), cut  # flow control: nowhere near the 50 MB
    assert max(t for t, _ in cut) < 8, cut
    assert failures == {"web-1": 0} and after == 200, (failures, after)

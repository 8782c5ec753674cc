"""The Python cost of one proxied HTTP request, without sockets.

Drives a real HttpClient and Upstream (workers/proxy/http.py) built on a real
Router, with in-memory transports standing in for the kernel, so the figure
is the per-request Python work the end-to-end benchmark (bench/run) cannot
separate from syscalls. For optimizing the hot path:

    .venv/bin/python bench/http_path.py [-n 200000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

from lbc_workers.proxy import http
from lbc_workers.proxy.accesslog import AccessLog
from lbc_workers.proxy.router import Router

from lbc.compiler import compile_config
from lbc.config import load
from lbc.state import slot_key

HERE = Path(__file__).resolve().parent
CONFIG = """\
version: 1
global: {workers: 1}
listeners:
  - name: web
    bind: 127.0.0.1:8080
    routes:
      - match: {path_prefix: /api}
        pool: api
      - pool: web
pools:
  - name: web
    backends:
      - {id: web-1, address: 127.0.0.1, port: 9101}
      - {id: web-2, address: 127.0.0.1, port: 9102}
  - name: api
    backends:
      - {id: api-1, address: 127.0.0.1, port: 9201}
"""
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 21:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


class Transport:
    """Counts what would have been written; never blocks."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.write(c)

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 40000) if name == "peername" else None

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: return False
    def can_write_eof(self) -> bool: return True
    def get_write_buffer_size(self) -> int: return 0


class Loop:
    def time(self) -> float:
        return time.monotonic()

    def create_task(self, coro):
        raise RuntimeError("the benchmark pre-connects every upstream")


class Worker:
    """The attributes HttpClient uses of workers/proxy/worker.py's Worker."""

    def __init__(self, router: Router) -> None:
        self.loop = Loop()
        self.router = router
        self.clients: set = set()
        self.dirty: set = set()
        self.waiters: dict = {}
        self.draining = False
        self.requests = self.connections_opened = self.rejected = 0
        self.access_log = None
        self._rid = 0
        self.now = time.monotonic()

    def next_request_id(self) -> bytes:
        self._rid += 1
        return b"00abcdef-%x" % self._rid

    def backend_freed(self, backend) -> None: ...

    def wait_for_backend(self, pool, client) -> None:
        raise RuntimeError("no backend")


def build(headers: bytes) -> tuple[http.HttpClient, Worker, bytes]:
    tmp = Path("/tmp/_lbc_http_path.yaml")
    tmp.write_text(CONFIG)
    table = compile_config(load(tmp))
    slots = {slot_key(p.name, b): i for i, (p, b) in enumerate((p, b) for p in table.pools for b in p.backends)}
    router = Router.build("v1", table, slots, None, Path("/nonexistent"))
    worker = Worker(router)
    key = table.listeners[0].socket_key
    pools = {b.key: p for p in router.pools.values() for b in p.backends}
    for backend in router.backends.values():
        for _ in range(4):
            up = http.Upstream(worker, backend, pools[backend.key])
            up.connection_made(Transport())
            backend.idle.append(up)
    client = http.HttpClient(worker, key)
    client.connection_made(Transport())
    request = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" + headers + b"\r\n"
    return client, worker, request


def run(n: int, headers: bytes, access_log: bool = False) -> float:
    client, worker, request = build(headers)
    if access_log:  # as the product default: a line per request into a buffered file
        worker.access_log = AccessLog(Path("/tmp/_lbc_http_path.log"), "combined")
    start = time.perf_counter()
    for _ in range(n):
        client.data_received(request)
        client.up.data_received(RESPONSE)
    elapsed = time.perf_counter() - start
    assert worker.requests == n, worker.requests
    return elapsed / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--bare", action="store_true", help="no request headers beyond Host")
    parser.add_argument("--access-log", action="store_true", help="write access log lines (to /tmp)")
    args = parser.parse_args()
    text = (HERE / "realistic-headers.txt").read_bytes()
    headers = b"" if args.bare else b"".join(line.rstrip(b"\r") + b"\r\n" for line in text.splitlines() if line)
    run(2000, headers)  # warm-up
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.n, headers, args.access_log)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        return 0
    results = sorted(run(args.n, headers, args.access_log) for _ in range(5))
    print(f"python per request: median {results[2]:.2f} us (min {results[0]:.2f}, max {results[-1]:.2f}), "
          f"{'bare' if args.bare else 'realistic'} headers, {args.n} requests x 5"
          + (", access log on" if args.access_log else ""))
    Path("/tmp/_lbc_http_path.log").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The proxy worker process: one uvloop event loop, SO_REUSEPORT listeners,
the live Router, and the adapters to the outside (signals, the state
directory, shared memory).

Reload (SIGHUP), as a state machine per worker:

    serving v1 ──SIGHUP──▶ read `current` (v2), load and check the table,
                           build Router v2 beside v1, open new listeners
         │ any failure: stay on v1, report the error for v2 in shared memory
         ▼
    flip worker.router to v2, report "serving v2"; then, in the background:
      - listeners that are gone stop accepting; their idle keep-alive
        connections close now, busy ones after their current request;
      - backends that are gone or disabled get no new requests; their idle
        pooled connections close now; requests still on them may finish
        until the pool's drain_timeout, then their connections are cut.

Nothing else closes: a listener whose bind did not change keeps its socket,
and kept-alive clients simply use v2 for their next request.

supervisord signals processes that are still starting, so the first thing
the process does (in __main__) is to ignore SIGHUP; the real handler is
installed before the first read of `current`, so no update is missed.

SIGTERM (lbc down, supervisord stopping): stop accepting, close idle
connections at once, let busy ones finish, up to the drain timeout, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections import deque
from pathlib import Path

from lbc_workers.proxy import tls
from lbc_workers.proxy.accesslog import AccessLog
from lbc_workers.proxy.http import HttpClient
from lbc_workers.proxy.passthrough import PassthroughClient
from lbc_workers.proxy.router import BackendRuntime, BindKey, PoolRuntime, Router
from lbc_workers.proxy.store import RedisStore
from lbc_workers.proxy.tcp import TcpClient
from lbc_workers.proxy.udp import UdpListener

from lbc import shm as shmmod
from lbc.errors import LbcError
from lbc.state import StateDir
from lbc.table import TableError

log = logging.getLogger("lbc.worker")
PUBLISH_EVERY = 0.25  # seconds between counter publications
HEALTH_EVERY = 0.05  # seconds between looks at the health overlay's generation
SWEEP_EVERY = 0.5  # seconds between timeout sweeps
BACKLOG = 4096
ROOM_BATCH = 32  # idle connections closed at once when the client limit is reached


class Clients(dict):
    """A set that keeps insertion order, so the limit closes the oldest idle
    connections first, not one accepted a moment ago."""

    __slots__ = ()

    def add(self, client) -> None:
        self[client] = None

    def discard(self, client) -> None:
        self.pop(client, None)


class Refused(asyncio.Protocol):
    """A connection over max_client_connections: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Worker:
    def __init__(self, state: StateDir, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.slot = slot
        self.loop = loop
        self.router: Router | None = None
        self.servers: dict[BindKey, object] = {}  # asyncio Server, or UdpListener
        self.tls_policy: dict[BindKey, tuple] = {}  # what each https socket's entry context was made of
        self.clients = Clients()  # every connection and UDP session, for sweeps, drains and the limit
        self.dirty: set = set()  # counters to publish: BackendRuntime and ListenerStats
        self.retired: dict[str, BackendRuntime] = {}  # draining backends by identity
        self.waiters: dict[str, deque] = {}  # pool name -> clients waiting for a free backend
        self.stores: dict[str, RedisStore] = {}  # sticky stores by URL, kept across reloads
        self.access_log: AccessLog | None = None
        self.access_log_settings: object = None  # what it was opened with
        self.draining = False
        self.requests = 0
        self.connections_opened = 0
        self.rejected = 0
        self.reloads_ok = self.reloads_failed = 0
        self._rid = 0
        self._rid_prefix = b"%02x%06x-" % (slot, int(time.time()) & 0xFFFFFF)
        self._reload_lock = asyncio.Lock()
        self._reload_again = False
        self.stopped = asyncio.Event()
        # The clock deadlines are set from: refreshed by housekeeping, since
        # timeouts are swept twice a second anyway (no clock read per request).
        self.now = loop.time()
        self.shm = shmmod.Shm(state.run / "shm", writable=True)
        self.publish_backend = self.shm.backend_writer(slot)
        self._health_seen: tuple = ()  # (generation, trust per pool) last applied
        # Every client connection may need a backend connection: half the
        # open files, less a reserve for listeners, logs and the store.
        self.fd_clients = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64) // 2
        self.max_clients = self.fd_clients
        self._no_room_at = -1.0  # when _make_room last found nothing idle
        self._next_unejection = float("inf")

    # -- the hot path's helpers --------------------------------------------------

    def next_request_id(self) -> bytes:
        self._rid += 1
        return self._rid_prefix + b"%x" % self._rid

    def wait_for_backend(self, pool: str, client) -> None:
        self.waiters.setdefault(pool, deque()).append(client)

    def backend_freed(self, backend: BackendRuntime) -> None:
        """Called when a request leaves a backend that has waiters or drains
        (the hot path checks both before calling)."""
        waiting = self.waiters.get(backend.pool)
        while waiting:
            client = waiting.popleft()
            if client.waiting_for_backend():
                client.retry_dispatch()
                break
        if waiting is not None and not waiting:
            del self.waiters[backend.pool]  # empty: the hot path skips this call again
        if backend.removed_at is not None and backend.active <= 0 and not backend.conns:
            self.retired.pop(backend.key, None)

    # -- reload ----------------------------------------------------------------------

    async def reload(self) -> None:
        """Load `current`. Reloads are serialized; a SIGHUP during one runs
        another right after it, so the last installed table always wins."""
        if self._reload_lock.locked():
            self._reload_again = True
            return
        async with self._reload_lock:
            while True:
                self._reload_again = False
                await self._reload_once()
                if not self._reload_again:
                    break

    async def _reload_once(self) -> None:
        version = self.state.current_version()
        if version is None:
            self._report(attempted="", error="no table is installed")
            return
        if self.router is not None and self.router.version == version:
            self._report(attempted=version, error="")
            return
        opened: list[BindKey] = []
        replaced: dict[BindKey, object] = {}  # https sockets whose TLS policy changed: the old servers
        try:
            _fault("reject", version)
            table = self.state.read_table(version)
            router = Router.build(version, table, self.state.slots(), self.router, self.state.secrets,
                                  node_secret=self.state.node_secret)
            for key, listener in router.listeners.items():
                if key in self.servers and key[0] == "tls" and self.tls_policy.get(key) != tls.policy(listener.spec.tls):
                    replaced[key] = self.servers.pop(key)  # a new socket beside it, then it closes
                if key not in self.servers:
                    await self._open(key, listener)
                    opened.append(key)
        except (LbcError, TableError, OSError, ValueError, ssl.SSLError) as e:
            for key in opened:
                self._close_listener(key)
            self.servers.update(replaced)
            message = f"{type(e).__name__}: {e}" if not isinstance(e, LbcError) else str(e)
            log.error("cannot serve table %s: %s", version[:12], message)
            self.reloads_failed += 1
            self._report(attempted=version, error=message)
            return
        old, self.router = self.router, router
        self.max_clients = min(router.max_clients, self.fd_clients)
        self._follow_access_log(table.settings.access_log)
        for server in replaced.values():
            server.close()  # its connections go on; new ones reach the new socket
        if old is not None:
            self._retire(old, router)
        self.refresh_health(force=True)
        self.reloads_ok += 1
        self._report(attempted=version, error="", version=version)
        log.info("serving table %s", version[:12])
        gc.collect()
        gc.freeze()  # the router lives long: keep it out of the collector's way

    def _follow_access_log(self, settings) -> None:
        if settings == self.access_log_settings and (self.access_log is not None or settings is None):
            return
        if self.access_log is not None:
            with contextlib.suppress(OSError):
                self.access_log.close()
            self.access_log = None
        self.access_log_settings = settings
        if settings is not None:
            directory = Path(settings.directory) if settings.directory else self.state.run
            try:
                self.access_log = AccessLog(directory / f"access-{self.slot}.log", settings.format)
            except OSError as e:  # the table is served; say why nothing is logged (the next reload retries)
                log.error("cannot open the access log in %s: %s", directory, e.strerror)

    def drop_access_log(self, e: OSError) -> None:
        """A write failed (disk full, EIO): stop logging rather than stop serving;
        `lbc reopen-logs` or the next reload tries again."""
        log.error("access log %s: %s; access logging stops until lbc reopen-logs",
                  self.access_log.path if self.access_log else "?", e.strerror or e)
        if self.access_log is not None:
            with contextlib.suppress(OSError):
                self.access_log.close()
        self.access_log = None

    def reopen_logs(self) -> None:
        if self.access_log is None and self.access_log_settings is not None:
            self.access_log_settings = None  # dropped after an error: open it again
            self._follow_access_log(self.router.table.settings.access_log if self.router else None)
            return
        if self.access_log is not None:
            try:
                self.access_log.reopen()
            except OSError as e:
                self.drop_access_log(e)

    def _report(self, attempted: str, error: str, version: str | None = None) -> None:
        fields: dict[str, object] = {"attempted": attempted, "error": error, "heartbeat": time.time()}
        if version is not None:
            fields.update(version=version, state=shmmod.SERVING)
        info = self.shm.read_worker(self.slot)
        fields["generation"] = info.generation + 1
        self.shm.write_worker(self.slot, **fields)

    def _retire(self, old: Router, new: Router) -> None:
        for key in list(self.servers):
            if key not in new.listeners:
                self._close_listener(key)
        for client in list(self.clients):
            if client.key not in new.listeners:
                client.close_if_idle()
        now = self.loop.time()
        for backend in new.removed_since(old):
            if backend.key in new.backends and new.backends[backend.key].enabled:
                continue
            backend.removed_at = now
            for up in backend.idle:
                up.transport.close()
            backend.idle.clear()
            if backend.active > 0 or backend.conns:
                self.retired[backend.key] = backend
        # Pools gone from the table: their waiters get a 503 from the sweep.

    async def _open(self, key: BindKey, listener) -> None:
        transport, host, port = key
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.setblocking(False)
            if transport == "udp":
                _, protocol = await self.loop.create_datagram_endpoint(lambda: UdpListener(self, key), sock=sock)
                self.servers[key] = protocol
            else:
                sock.listen(BACKLOG)
                context = None
                if transport == "tls":
                    spec = listener.spec.tls
                    context = tls.entry_context(spec, self.state.secrets, lambda: self._certificates(key))
                    self.tls_policy[key] = tls.policy(spec)
                self.servers[key] = await self.loop.create_server(
                    lambda: self._accept(key), sock=sock, backlog=BACKLOG, ssl=context,
                    ssl_handshake_timeout=listener.header_s if context else None)
        except BaseException:
            sock.close()
            raise

    def _certificates(self, key: BindKey):
        listener = self.router.listeners.get(key) if self.router else None
        return listener.certificates if listener is not None else None

    def _accept(self, key: BindKey):
        if len(self.clients) >= self.max_clients and (self.now == self._no_room_at or not self._make_room()):
            self.rejected += 1
            return Refused()
        listener = self.router.listeners.get(key)
        if listener is not None and listener.protocol in ("http", "https"):
            return HttpClient(self, key)
        if listener is not None and listener.protocol == "tls_passthrough":
            return PassthroughClient(self, key)
        return TcpClient(self, key)

    def _make_room(self) -> bool:
        """At max_client_connections: close up to ROOM_BATCH idle HTTP
        connections (between requests, or silent since accepted), oldest
        first, as NGINX
        drains its reusable connections, so a flood of idle connections
        cannot lock real clients out. One scan frees a batch, so a flood
        costs one scan per ROOM_BATCH accepts. False when none is idle."""
        victims = []
        for client in self.clients:
            if type(client) is HttpClient and client.idle():
                victims.append(client)
                if len(victims) == ROOM_BATCH:
                    break
        for client in victims:
            self.clients.discard(client)  # counted out now: its connection_lost comes later
            client.close_if_idle()
        if not victims:
            self._no_room_at = self.now  # no second scan until the clock moves (a quarter second)
        return bool(victims)

    def _close_listener(self, key: BindKey) -> None:
        server = self.servers.pop(key, None)
        if isinstance(server, UdpListener):
            server.close_sessions()
            if server.transport is not None:
                server.transport.close()
        elif server is not None:
            server.close()

    # -- health: the checker's overlay and this worker's passive view ------------------------

    def refresh_health(self, force: bool = False) -> None:
        """Rebuild each pool's members when the checker's verdicts moved, its
        trust changed, or an ejection ran out; drain backends that turned
        unhealthy and stop draining those that came back."""
        router = self.router
        if router is None:
            return
        now = self.loop.time()
        generation = self.shm.health_generation()
        beat, _ = self.shm.health_heartbeat()
        age = time.time() - beat
        trust = tuple(age < p.trust_s for p in router.pools.values())
        seen = (generation, trust)
        if not force and seen == self._health_seen and now < self._next_unejection:
            return
        self._health_seen = seen
        self._next_unejection = float("inf")
        for pool, trusted in zip(router.pools.values(), trust, strict=True):
            self._refresh_pool(pool, trusted, now)

    def _refresh_pool(self, pool: PoolRuntime, trusted: bool, now: float) -> None:
        shm = self.shm
        for b in pool.enabled:
            if b.hostname:
                b.connect_address = shm.read_health(b.slot).address
        pool.refresh([shm.health_state(b.slot) for b in pool.enabled], trusted, now)
        for b in pool.enabled:
            if b.ejected_until > now:
                self._next_unejection = min(self._next_unejection, b.ejected_until)
            if b.unhealthy and b.removed_at is None:
                # No new requests; idle pooled connections go now, busy ones
                # may finish within the drain timeout (the sweep cuts the rest).
                b.removed_at = now
                for up in b.idle:
                    up.transport.close()
                b.idle.clear()
                self.retired[b.key] = b
            elif not b.unhealthy and b.removed_at is not None and self.retired.get(b.key) is b and b.enabled:
                b.removed_at = None
                del self.retired[b.key]

    def store(self, url: str) -> RedisStore:
        store = self.stores.get(url)
        if store is None:
            store = self.stores[url] = RedisStore(url)  # the URL was checked when the table was compiled
        return store

    def backend_failed(self, pool: PoolRuntime, backend: BackendRuntime) -> None:
        """A connection failure or a 5xx: passive health counts it."""
        backend.failures += 1
        backend.consecutive_failures += 1
        limit = pool.spec.outlier_detection.consecutive_failures
        if limit and backend.consecutive_failures >= limit and pool.eject(backend, self.loop.time()):
            log.warning("backend %s of pool %s ejected for %.0fs after %d consecutive failures",
                        backend.id, pool.name, backend.ejected_until - self.loop.time(), limit)
            self._next_unejection = min(self._next_unejection, backend.ejected_until)
            beat, _ = self.shm.health_heartbeat()
            self._refresh_pool(pool, time.time() - beat < pool.trust_s, self.loop.time())

    async def watch_health(self) -> None:
        while not self.stopped.is_set():
            await asyncio.sleep(HEALTH_EVERY)
            self.refresh_health()

    # -- periodic work ---------------------------------------------------------------------

    async def housekeeping(self) -> None:
        """Publish counters a few times a second; sweep deadlines twice a second."""
        next_sweep = self.loop.time() + SWEEP_EVERY
        while not self.stopped.is_set():
            await asyncio.sleep(PUBLISH_EVERY)
            self.now = now = self.loop.time()
            self.publish()
            if now >= next_sweep:
                next_sweep = now + SWEEP_EVERY
                self.sweep(now)

    def publish(self) -> None:
        write = self.publish_backend
        for backend in self.dirty:
            write(backend.slot, *backend.counters())
        self.dirty.clear()
        if self.access_log is not None:
            try:
                self.access_log.flush()
            except OSError as e:
                self.drop_access_log(e)
        self.shm.write_worker(self.slot, heartbeat=time.time(), connections=len(self.clients), requests=self.requests,
                              reloads_ok=self.reloads_ok, reloads_failed=self.reloads_failed, rejected=self.rejected,
                              store_errors=sum(s.errors for s in self.stores.values()))

    def sweep(self, now: float) -> None:
        # Deadlines are set from self.now, up to PUBLISH_EVERY old: compared
        # with as old a clock, none fires before its time (at most 0.75 s after).
        due = now - PUBLISH_EVERY
        for client in [c for c in self.clients if c.deadline and c.deadline < due]:
            client.on_timeout()
        for key, backend in list(self.retired.items()):
            if now - backend.removed_at >= backend.drain_ms / 1000:
                for up in list(backend.conns):
                    up.transport.abort()
                self.retired.pop(key, None)

    # -- shutdown ---------------------------------------------------------------------------

    async def shutdown(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.shm.write_worker(self.slot, state=shmmod.DRAINING)
        for key in list(self.servers):
            self._close_listener(key)
        for client in list(self.clients):
            client.close_if_idle()
        override = self.shm.drain_override_ms()
        drain_ms = override if override is not None else (
            self.router.table.settings.drain_timeout_ms if self.router else 0)
        deadline = self.loop.time() + drain_ms / 1000
        while self.clients and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            transport = getattr(client, "transport", None)
            if transport is not None:
                transport.abort()
        self.publish()
        if self.access_log is not None:
            with contextlib.suppress(OSError):
                self.access_log.close()
            self.access_log = None
        for store in self.stores.values():
            with contextlib.suppress(Exception):  # best effort at exit: Redis may be gone
                await asyncio.wait_for(store.close(), 1)
        self.stopped.set()


def _fault(point: str, version: str) -> None:
    """LBC_WORKER_FAULT=reject:<version prefix> makes this worker refuse that
    table, as a worker that cannot load it would (for tests of apply's revert)."""
    spec = os.environ.get("LBC_WORKER_FAULT", "")
    kind, _, prefix = spec.partition(":")
    if kind == point and prefix and version.startswith(prefix):
        raise ValueError(f"table refused by LBC_WORKER_FAULT={spec}")


def _configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbc_workers.proxy")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--slot", required=True, type=int)
    args = parser.parse_args(argv)
    _configure_logging()
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    state = StateDir(args.state)
    worker = Worker(state, args.slot, loop)
    pid_file = state.run / f"worker-{args.slot}.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    worker.shm.clear_worker(args.slot)
    worker.shm.write_worker(args.slot, pid=os.getpid(), started=time.time(), state=shmmod.STARTING)

    # The real SIGHUP handler goes in before `current` is first read.
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(worker.reload()))
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.shutdown()))
    loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(worker.shutdown()))
    loop.add_signal_handler(signal.SIGUSR1, worker.reopen_logs)

    async def run() -> None:
        await worker.reload()
        housekeeping = loop.create_task(worker.housekeeping())
        health = loop.create_task(worker.watch_health())
        await worker.stopped.wait()
        housekeeping.cancel()
        health.cancel()

    try:
        loop.run_until_complete(run())
    finally:
        # A leftover of an earlier run (its supervisord was killed) exits
        # after its successor took the slot: leave the successor's pid file.
        # (Its shared memory is the old, replaced file: `lbc up` makes a new
        # one; the pid test there only guards against that changing.)
        if worker.shm.read_worker(args.slot).pid == os.getpid():
            worker.shm.write_worker(args.slot, state=shmmod.EMPTY, pid=0)
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():
                pid_file.unlink()
    return 0

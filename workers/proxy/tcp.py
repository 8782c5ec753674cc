"""TCP proxying: bytes both ways with backpressure and half-close.

A connection picks its backend when it is accepted (hashing on the client
address for hashing pools; a tls_passthrough one once its ClientHello is
read, see passthrough.py) and keeps the Router it started with until it
closes. While the backend connection opens, the client is not read. Either
side's EOF is passed on as a write EOF to the other, and the pair closes
once both directions have ended, so a client that shuts down writing still
receives everything the backend sends after that. TLS to a backend (a
pool's `tls`) has no half-close in asyncio: there the client's EOF is not
passed on, and the pair ends when the backend closes or idles out.

Backpressure: a side whose write buffer is full stops reading the other
side, so a peer that does not read holds nothing but the transports'
bounded buffers in the worker. When nothing moves for the listener's idle
timeout, the worker's sweep ends the pair (aborting a side that cannot
flush, since its peer stopped reading).

Draining: the backend connection is in its backend's `conns` set, so when an
apply removes the backend the worker's sweep cuts it after the pool's
drain_timeout (and the client connection closes with it). When the
listener is removed, or the worker stops, the connection keeps going for
the pool's drain_timeout, then closes (one timer, armed once).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from lbc_workers.proxy.store import pick_remembered, remembered_here

log = logging.getLogger("lbc.worker")

if TYPE_CHECKING:
    from lbc_workers.proxy.router import BackendRuntime, ListenerRuntime, PoolRuntime
    from lbc_workers.proxy.worker import Worker


class TcpUpstream(asyncio.Protocol):
    __slots__ = ("client", "backend", "transport", "closed")

    def __init__(self, client: TcpClient, backend: BackendRuntime) -> None:
        self.client = client
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.from_backend(data)

    def eof_received(self) -> bool:
        # A TLS transport closes after the backend's close_notify whatever this returns.
        return self.client.backend_eof() and self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.backend.conns.discard(self)
        self.client.backend_lost()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()


class TcpClient(asyncio.Protocol):
    __slots__ = ("worker", "key", "transport", "up", "backend", "pending", "eofs", "closed", "deadline",
                 "deadline_status", "idle_s", "drain", "pool")

    def __init__(self, worker: Worker, key) -> None:
        self.worker = worker
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.up: TcpUpstream | None = None
        self.backend: BackendRuntime | None = None
        self.pending: list[bytes] = []
        self.eofs = 0  # bit 1: client sent EOF, bit 2: backend sent EOF
        self.closed = False
        self.deadline = 0.0
        self.deadline_status = 0
        self.drain: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker.clients.add(self)
        self.worker.connections_opened += 1
        listener = self.worker.router.listeners.get(self.key)
        if listener is None or listener.pool is None:
            transport.close()
            return
        self.open(listener, listener.pool)

    def open(self, listener: ListenerRuntime, pool: PoolRuntime, first: bytes = b"") -> None:
        """Pick a backend of `pool` and connect to it, not reading the client
        meanwhile; `first` (bytes already read from the client) goes ahead
        of everything else."""
        transport = self.transport
        self.idle_s = listener.idle_s
        self.pool = pool
        peer = transport.get_extra_info("peername")
        affinity = pool.affinity  # source_ip stickiness: the only kind L4 has
        if affinity is not None and peer:
            key = peer[0].encode()
            store = self.worker.store(affinity.store) if affinity.store is not None else None
            backend = remembered_here(store, affinity, pool, key) if store is not None else None
            if backend is not None:
                self._begin(listener, backend, first)
                return
            if store is not None and store.available():
                transport.pause_reading()
                self.deadline = self.worker.now + listener.connect_s
                self.worker.loop.create_task(self._remembered(listener, store, key, first))
                return
            backend = affinity.hashed(pool.members, key)
        else:
            backend = pool.pick(peer[0].encode() if peer and pool.hash_key else None)
        self._begin(listener, backend, first)

    async def _remembered(self, listener: ListenerRuntime, store, key: bytes, first: bytes) -> None:
        try:
            backend = await pick_remembered(store, self.pool.affinity, self.pool, key)
        except Exception:  # noqa: BLE001 - a task's edge: the connection must go on whatever the store did
            log.exception("sticky store lookup failed")
            backend = self.pool.affinity.hashed(self.pool.members, key)
        if not self.closed:
            self._begin(listener, backend, first)

    def _begin(self, listener: ListenerRuntime, backend: BackendRuntime | None, first: bytes) -> None:
        worker = self.worker
        transport = self.transport
        if backend is None:
            transport.close()
            return
        self.backend = backend
        backend.active += 1
        backend.requests += 1
        worker.dirty.add(backend)
        if first:
            self.pending.append(first)
            backend.bytes_in += len(first)
        transport.pause_reading()
        self.deadline = worker.now + listener.connect_s
        worker.loop.create_task(self._connect(backend, listener.connect_s))

    async def _connect(self, backend: BackendRuntime, timeout: float) -> None:
        try:
            _, up = await asyncio.wait_for(
                self.worker.loop.create_connection(
                    lambda: TcpUpstream(self, backend), backend.connect_address, backend.port, ssl=self.pool.ssl,
                    server_hostname=(self.pool.sni or backend.address) if self.pool.ssl else None),
                timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            self.worker.backend_failed(self.pool, backend)
            self.transport.close()
            return
        backend.consecutive_failures = 0
        if self.closed:
            up.transport.close()
            return
        self.up = up
        backend.conns.add(up)  # cut by the sweep if the backend is removed and its drain runs out
        for piece in self.pending:
            up.transport.write(piece)
        self.pending = []
        if self.eofs & 1 and up.transport.can_write_eof():
            up.transport.write_eof()
        self.deadline = self.worker.now + self.idle_s
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.deadline = self.worker.now + self.idle_s
        up = self.up
        if up is None:
            self.pending.append(data)
        else:
            up.transport.write(data)
        backend = self.backend
        backend.bytes_in += len(data)

    def from_backend(self, data: bytes) -> None:
        self.deadline = self.worker.now + self.idle_s
        self.transport.write(data)
        self.backend.bytes_out += len(data)

    def eof_received(self) -> bool:
        self.eofs |= 1
        # (not over TLS to the backend: no half-close; see the top)
        if self.up is not None and not self.up.closed and self.up.transport.can_write_eof():
            self.up.transport.write_eof()
        return self._keep_open()

    def backend_eof(self) -> bool:
        self.eofs |= 2
        if not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()
        return self._keep_open()

    def _keep_open(self) -> bool:
        if self.eofs == 3:
            self.transport.close()
            if self.up is not None:
                self.up.transport.close()
            return False
        return True

    def backend_lost(self) -> None:
        if not self.closed:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.worker.clients.discard(self)
        if self.drain is not None:
            self.drain.cancel()
        up = self.up
        if up is not None and not up.closed:
            up.transport.close()
        backend = self.backend
        if backend is not None:
            self.backend = None
            if up is not None:
                backend.conns.discard(up)
            backend.active -= 1
            self.worker.dirty.add(backend)
            self.worker.backend_freed(backend)

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and not self.up.closed:
            self.up.transport.resume_reading()

    def on_timeout(self) -> None:
        """Idle past the listener's idle timeout (or drained): close both
        sides. A side still holding bytes its peer does not read is aborted:
        close() would wait for that peer forever."""
        for transport in (self.transport, self.up.transport if self.up is not None else None):
            if transport is None:
                continue
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def idle(self) -> bool:
        return False  # a TCP connection is never known to be idle: it drains

    def close_if_idle(self) -> bool:
        """The listener is gone or the worker stops: never idle, so drain for
        the pool's drain_timeout, then close."""
        if self.drain is None and not self.closed and self.backend is not None:
            self.drain = self.worker.loop.call_later(self.backend.drain_ms / 1000, self.on_timeout)
        return False

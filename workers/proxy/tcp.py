"""TCP proxying: bytes both ways with backpressure and half-close.

A connection picks its backend when it is accepted (hashing on the client
address for hashing pools) and keeps the Router it started with until it
closes. While the backend connection opens, the client is not read. Either
side's EOF is passed on as a write EOF to the other, and the pair closes
once both directions have ended, so a client that shuts down writing still
receives everything the backend sends after that.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbc_workers.proxy.router import BackendRuntime
    from lbc_workers.proxy.worker import Worker


class TcpUpstream(asyncio.Protocol):
    __slots__ = ("client", "transport", "closed")

    def __init__(self, client: TcpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.from_backend(data)

    def eof_received(self) -> bool:
        return self.client.backend_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.backend_lost()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()


class TcpClient(asyncio.Protocol):
    __slots__ = ("worker", "key", "transport", "up", "backend", "pending", "eofs", "closed", "deadline",
                 "deadline_status", "idle_s")

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        worker = self.worker
        worker.clients.add(self)
        worker.connections_opened += 1
        listener = worker.router.listeners.get(self.key)
        if listener is None or listener.pool is None:
            transport.close()
            return
        self.idle_s = listener.idle_s
        pool = listener.pool
        peer = transport.get_extra_info("peername")
        key = peer[0].encode() if peer and pool.hash_key else None
        backend = pool.pick(key)
        if backend is None:
            transport.close()
            return
        self.backend = backend
        backend.active += 1
        backend.requests += 1
        worker.dirty.add(backend)
        transport.pause_reading()
        self.deadline = worker.loop.time() + listener.connect_s
        worker.loop.create_task(self._connect(backend, listener.connect_s))

    async def _connect(self, backend: BackendRuntime, timeout: float) -> None:
        try:
            _, up = await asyncio.wait_for(
                self.worker.loop.create_connection(lambda: TcpUpstream(self), backend.address, backend.port), timeout
            )
        except (TimeoutError, OSError):
            backend.failures += 1
            self.transport.close()
            return
        if self.closed:
            up.transport.close()
            return
        self.up = up
        for piece in self.pending:
            up.transport.write(piece)
        self.pending = []
        if self.eofs & 1:
            up.transport.write_eof()
        self.deadline = self.worker.loop.time() + self.idle_s
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.deadline = self.worker.loop.time() + self.idle_s
        up = self.up
        if up is None:
            self.pending.append(data)
        else:
            up.transport.write(data)
        backend = self.backend
        backend.bytes_in += len(data)

    def from_backend(self, data: bytes) -> None:
        self.deadline = self.worker.loop.time() + self.idle_s
        self.transport.write(data)
        self.backend.bytes_out += len(data)

    def eof_received(self) -> bool:
        self.eofs |= 1
        if self.up is not None and not self.up.closed:
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
        if self.up is not None and not self.up.closed:
            self.up.transport.close()
        backend = self.backend
        if backend is not None:
            self.backend = None
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
        self.transport.close()
        if self.up is not None:
            self.up.transport.close()

    def idle(self) -> bool:
        return False  # a TCP connection is never known to be idle: it drains

    def close_if_idle(self) -> bool:
        return False

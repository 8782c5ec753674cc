"""UDP proxying: a session per client address, to one backend, until idle.

The listener's socket is bound to a concrete address (validation refuses a
wildcard), so replies sent from it leave from the address the client sent
to, and a client with a connect()ed socket accepts them. Each session has
its own connected socket to its backend; datagrams that arrive while it
opens are queued (bounded). A session keeps the Router it started with and
ends after the listener's idle timeout (the worker's sweep closes it). An
open session is in its backend's `conns` set: when an apply removes the
backend, the sweep ends the session after the pool's drain_timeout, and the
client's next datagram starts a new session on a backend that is in the
table. A removed listener ends its sessions at once (its socket, which
replies leave from, is closed).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbc_workers.proxy.router import BackendRuntime
    from lbc_workers.proxy.worker import Worker

MAX_QUEUED = 64


class _BackendSide(asyncio.DatagramProtocol):
    __slots__ = ("session",)

    def __init__(self, session: UdpSession) -> None:
        self.session = session

    def datagram_received(self, data: bytes, addr) -> None:
        self.session.from_backend(data)

    def error_received(self, exc: Exception) -> None:
        self.session.backend.failures += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()


class UdpSession:
    __slots__ = ("listener", "key", "client", "backend", "transport", "queue", "deadline", "deadline_status",
                 "closed", "idle_s")

    def __init__(self, listener: UdpListener, client, backend: BackendRuntime, idle_s: float) -> None:
        self.listener = listener
        self.key = listener.key  # the worker's reload looks up every connection's listener by it
        self.client = client
        self.backend = backend
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: list[bytes] = []
        self.idle_s = idle_s
        self.deadline = listener.worker.now + idle_s
        self.deadline_status = 0
        self.closed = False

    async def open(self) -> None:
        try:
            transport, _ = await self.listener.worker.loop.create_datagram_endpoint(
                lambda: _BackendSide(self), remote_addr=(self.backend.connect_address, self.backend.port)
            )
        except OSError:
            self.backend.failures += 1
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self.transport = transport
        self.backend.conns.add(self)
        for data in self.queue:
            transport.sendto(data)
        self.queue = []

    def to_backend(self, data: bytes) -> None:
        self.deadline = self.listener.worker.now + self.idle_s
        self.backend.bytes_in += len(data)
        if self.transport is None:
            if len(self.queue) < MAX_QUEUED:
                self.queue.append(data)
        else:
            self.transport.sendto(data)

    def from_backend(self, data: bytes) -> None:
        self.deadline = self.listener.worker.now + self.idle_s
        self.backend.bytes_out += len(data)
        self.listener.reply(data, self.client)

    def on_timeout(self) -> None:
        self.close()

    def idle(self) -> bool:
        return False

    def close_if_idle(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        worker = self.listener.worker
        worker.clients.discard(self)
        self.listener.sessions.pop(self.client, None)
        if self.transport is not None:
            self.transport.close()
            self.backend.conns.discard(self)
        self.backend.active -= 1
        worker.dirty.add(self.backend)
        worker.backend_freed(self.backend)


class UdpListener(asyncio.DatagramProtocol):
    """The listening socket's protocol; stays across reloads like a TCP
    listener's socket does."""

    def __init__(self, worker: Worker, key) -> None:
        self.worker = worker
        self.key = key
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[object, UdpSession] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr) -> None:
        session = self.sessions.get(addr)
        if session is None or session.closed:
            worker = self.worker
            if len(worker.clients) >= worker.max_clients:
                worker.rejected += 1  # max_client_connections: no new session (and no socket) for it
                return
            listener = worker.router.listeners.get(self.key)
            if listener is None or listener.pool is None:
                return
            pool = listener.pool
            if pool.affinity is not None:  # source_ip stickiness: the ring (sessions do not wait on a store)
                backend = pool.affinity.hashed(pool.members, addr[0].encode())
            else:
                backend = pool.pick(addr[0].encode() if pool.hash_key else None)
            if backend is None:
                return
            backend.active += 1
            backend.requests += 1
            self.worker.dirty.add(backend)
            session = UdpSession(self, addr, backend, listener.idle_s)
            self.sessions[addr] = session
            self.worker.clients.add(session)
            self.worker.loop.create_task(session.open())
        session.to_backend(data)

    def reply(self, data: bytes, addr) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def close_sessions(self) -> None:
        for session in list(self.sessions.values()):
            session.close()

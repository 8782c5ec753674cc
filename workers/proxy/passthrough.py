"""tls_passthrough: TLS forwarded untouched, routed by the SNI name of the
client's ClientHello.

A connection first reads the ClientHello, without decrypting anything
(clienthello.py): at most 16 KiB, within the listener's client_header
timeout counted from the accept (a deadline set once, so a client that
trickles bytes gains nothing by it). Its server name picks the pool
(ListenerRuntime.route_sni: the first route whose host matches, else the
listener's pool); from then on the connection is a TcpClient: the bytes read
so far go to the backend first, unchanged, and everything after is TCP's
(backpressure, half-close, drains, passive health).

A ClientHello that is malformed, oversized, cut short by the client's EOF
or by the deadline, or whose name no pool takes, closes the connection
before a backend is picked: backends see only connections that start with a
ClientHello lbc could read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lbc_workers.proxy import clienthello
from lbc_workers.proxy.tcp import TcpClient

if TYPE_CHECKING:
    from lbc_workers.proxy.router import ListenerRuntime
    from lbc_workers.proxy.worker import Worker


class PassthroughClient(TcpClient):
    __slots__ = ("listener", "hello", "wanted")

    def __init__(self, worker: Worker, key) -> None:
        super().__init__(worker, key)
        self.listener: ListenerRuntime | None = None
        self.hello: bytearray | None = bytearray()  # None once handed over to TCP
        self.wanted = 1  # parse again when the hello has this many bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        worker = self.worker
        worker.clients.add(self)
        worker.connections_opened += 1
        self.listener = worker.router.listeners.get(self.key)
        if self.listener is None:
            transport.close()
            return
        # Past it, TcpClient.on_timeout closes the client (there is no backend yet).
        self.deadline = worker.now + self.listener.header_s

    def data_received(self, data: bytes) -> None:
        hello = self.hello
        if hello is None:
            TcpClient.data_received(self, data)
            return
        hello += data
        if len(hello) < self.wanted:
            return
        result = clienthello.parse(hello)
        if isinstance(result, clienthello.NeedMore):  # less than 16 KiB held
            self.wanted = result.at_least
            return
        pool = self.listener.route_sni(result.server_name) if isinstance(result, clienthello.ClientHello) else None
        if pool is None:
            self.worker.rejected += 1
            self.transport.close()
            return
        self.hello = None
        self.open(self.listener, pool, bytes(hello))

    def eof_received(self) -> bool:
        if self.hello is None:
            return TcpClient.eof_received(self)
        return False  # a ClientHello cut short: close

    def close_if_idle(self) -> bool:
        """The listener is gone or the worker stops: before a backend is
        picked there is nothing to drain, so close at once."""
        if self.hello is None:
            return TcpClient.close_if_idle(self)
        self.transport.close()
        return True

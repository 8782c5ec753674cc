"""A minimal HTTP/1.1 proxy, the floor lbc's HTTP path is measured against.

What METHOD.md calls "a minimal Python proxy": uvloop, asyncio Protocols,
httptools, pooled keep-alive connections to one backend, request heads
validated by llhttp and forwarded as they came, response bytes passed
through unparsed (llhttp only finds where each response ends). No routing,
no header rules, no forwarded headers, no counters, no timeouts, no error
handling beyond closing. Not a product: a yardstick (bench/floor.py runs it
beside lbc and HAProxy).

    python bench/minimal_proxy.py LISTEN_HOST:PORT BACKEND_HOST:PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list) -> None:
        self.pool = pool
        self.client = None
        self.parser = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self, client, head: bytes) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(head)

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        self.pool.append(self)
        client.upstream = None


class Client(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int], pool: list) -> None:
        self.backend = backend
        self.pool = pool
        self.upstream = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def on_url(self, url: bytes) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        parser = httptools.HttpRequestParser(self)
        parser.feed_data(data)  # validate (bodies are out of scope here)
        if self.pool:
            up = self.pool.pop()
            self.upstream = up
            up.start(self, data)
        else:
            asyncio.get_running_loop().create_task(self.connect(data))

    async def connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self.pool), *self.backend)
        self.upstream = up
        up.start(self, head)


async def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    bhost, _, bport = sys.argv[2].rpartition(":")
    pool: list = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client((bhost, int(bport)), pool), host, int(port), backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())

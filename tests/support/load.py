"""Continuous HTTP load from a test: keep-alive clients in a thread."""

from __future__ import annotations

import asyncio
import threading


class Load:
    """Keep-alive clients sending requests as fast as they can, counting
    every failure (connection errors and non-200s alike)."""

    def __init__(self, host: str, port: int, clients: int) -> None:
        self.host, self.port, self.clients = host, port, clients
        self.ok = 0
        self.errors: list[str] = []
        self.backends: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    async def _client(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            while not self._stop.is_set():
                writer.write(f"GET / HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await asyncio.wait_for(reader.readexactly(length), 10)
                if not head.startswith(b"HTTP/1.1 200"):
                    self.errors.append(head.split(b"\r\n")[0].decode())
                else:
                    self.ok += 1
                    self.backends[body.decode().strip()] = self.backends.get(body.decode().strip(), 0) + 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            writer.close()

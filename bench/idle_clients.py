#!/usr/bin/env python3
"""Hold N idle keep-alive client connections to an HTTP listener.

    python bench/idle_clients.py HOST PORT N [--concurrency 200]

Opens N connections (at most --concurrency connecting at a time), sends one
small GET on each and reads its response, so each connection is a kept-alive
client between requests (the listener's idle timeout applies, not the
header timeout). Prints `READY <n>` once all are open (n is how many
answered 200), then holds them until stdin closes, closes them and exits.
bench/data_plane.py runs two of these to measure a worker's RSS per idle
connection.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: lbc-bench-idle\r\n\r\n"


async def one(host: str, port: int, gate: asyncio.Semaphore) -> socket.socket | None:
    loop = asyncio.get_running_loop()
    async with gate:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
            await loop.sock_sendall(sock, REQUEST)
            data = b""
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    continue
                length = 0
                for line in data[:end].lower().split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line[15:])
                if len(data) >= end + 4 + length:
                    break
            if not data.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(data[:40])
            return sock
        except (OSError, TimeoutError, ConnectionError, ValueError):
            sock.close()
            return None


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    gate = asyncio.Semaphore(args.concurrency)
    socks = await asyncio.gather(*(one(args.host, args.port, gate) for _ in range(args.count)))
    held = [s for s in socks if s is not None]
    print(f"READY {len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""A small origin server for tests: a real process on 127.0.0.0/8.

    python tests/support/origin.py --id web-1 --http 127.3.0.1:9101 [--tcp ADDR] [--udp ADDR]
        [--https ADDR --cert FILE --key FILE] [--tcps ADDR --cert FILE --key FILE]

HTTP paths (any method):
  /                 200, body "<id>\\n"
  /echo             200, JSON: id, method, target, the raw request head, body length and sha256,
                    and "connection": this connection's number (1, 2, ... in the order accepted)
  /slow?s=S&n=N     waits S seconds, then 200 with N bytes ("x")
  /stream?n=N       200, chunked: N bytes of a repeating pattern, in 64 KiB chunks
  /mirror           streams the request body back as it arrives (chunked); like
                    every path, stops reading while its writes are not read
  /status/NNN       that status, empty body
  /close            200 with Connection: close, then closes
  /health           200 "ok"
  /flap             200 and 500 by turns
  Upgrade requests  101, then every byte is echoed back
Every request head as received is appended (raw) to --log, when given.
TCP: echoes bytes; after the client's EOF it sends b"bye\\n" and closes.
UDP: answers each datagram with b"<id>:" + datagram.
--https ADDR: the same HTTP paths over TLS; --tcps ADDR: the TCP echo over TLS
(TLS has no half-close here: the client's close_notify ends the connection).
Both present --cert (PEM chain) with --key; /echo adds "tls": the protocol
version and the SNI name the client sent.
--hang ADDR: accepts connections and never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

import httptools

PATTERN = bytes(range(256)) * 256  # 64 KiB
FLAP = [0]
STATUS = [0]
CONNECTIONS = [0]  # accepted so far (HTTP and HTTPS)


class HttpOrigin(asyncio.Protocol):
    def __init__(self, ident: str, log) -> None:
        self.ident = ident
        self.log = log
        self.transport = None
        self.buf = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.head = b""
        self.body_hash = hashlib.sha256()
        self.body_len = 0
        self.mirror = False
        self.tunnel = False
        self.busy: asyncio.Task | None = None
        self.queue: list = []
        self.number = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        CONNECTIONS[0] += 1
        self.number = CONNECTIONS[0]

    # Flow control: while the client does not read what this origin writes
    # (/mirror, tunnels), stop reading from it, as a real server would.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.tunnel = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            rest = data[e.args[0]:]
            if rest:
                self.transport.write(rest)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.raw_headers = []
        self.body_hash = hashlib.sha256()
        self.body_len = 0
        self.mirror = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.method = method
        if self.log:
            self.log.write(json.dumps({"id": self.ident, "method": method, "target": self.url.decode("latin-1"),
                                       "headers": self.raw_headers}) + "\n")
            self.log.flush()
        if urlsplit(self.url.decode("latin-1")).path == "/mirror":
            self.mirror = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_hash.update(body)
        self.body_len += len(body)
        if self.mirror:
            self.transport.write(b"%x\r\n" % len(body) + body + b"\r\n")

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # answered with 101 by data_received; no second response
        request = (self.method, self.url.decode("latin-1"), list(self.raw_headers), self.body_len,
                   self.body_hash.hexdigest(), self.parser.should_keep_alive())
        if self.mirror:
            self.transport.write(b"0\r\n\r\n")
            return
        self.queue.append(request)
        if self.busy is None or self.busy.done():
            self.busy = asyncio.get_running_loop().create_task(self.serve_queue())

    async def serve_queue(self) -> None:
        while self.queue:
            await self.respond(*self.queue.pop(0))

    async def respond(self, method, target, headers, body_len, body_sha, keep_alive) -> None:
        if STATUS[0]:  # --status: every request gets it
            self._send(STATUS[0], b"", b"" if keep_alive else b"Connection: close\r\n")
            return
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        conn = b"" if keep_alive else b"Connection: close\r\n"
        path = url.path
        if path == "/echo":
            echo = {"id": self.ident, "method": method, "target": target, "headers": headers,
                    "body_len": body_len, "body_sha256": body_sha, "connection": self.number}
            sslobj = self.transport.get_extra_info("ssl_object")
            if sslobj is not None:
                echo["tls"] = {"version": sslobj.version(), "server_name": getattr(sslobj, "sni_name", None)}
            body = json.dumps(echo).encode()
            self._send(200, body, conn + b"Content-Type: application/json\r\n")
        elif path == "/slow":
            await asyncio.sleep(float(query.get("s", "1")))
            self._send(200, b"x" * int(query.get("n", "10")), conn)
        elif path == "/stream":
            n = int(query.get("n", "1000"))
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + conn + b"\r\n")
            sent = 0
            while sent < n:
                piece = PATTERN[: min(len(PATTERN), n - sent)]
                self.transport.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
                await asyncio.sleep(0)
                while self.transport.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0.005)
            self.transport.write(b"0\r\n\r\n")
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"", conn)
        elif path == "/close":
            self._send(200, f"{self.ident}\n".encode(), b"Connection: close\r\n")
            self.transport.close()
            return
        elif path == "/health":
            self._send(200, b"ok\n", conn)
        elif path == "/flap":  # healthy and unhealthy by turns, across connections
            FLAP[0] ^= 1
            self._send(200 if FLAP[0] else 500, b"", conn)
        else:
            self._send(200, f"{self.ident}\n".encode(), conn + b"X-Backend: " + self.ident.encode() + b"\r\n")
        if not keep_alive:
            self.transport.close()

    def _send(self, status: int, body: bytes, extra: bytes = b"") -> None:
        self.transport.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body))


class Hang(asyncio.Protocol):
    """Accepts and never answers."""

    def connection_made(self, transport) -> None:
        self.transport = transport


class TcpEcho(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write(b"bye\n")
        self.transport.close()
        return True

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, ident: str) -> None:
        self.prefix = ident.encode() + b":"

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(self.prefix + data, addr)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _server_context(cert: str | None, key: str | None) -> ssl.SSLContext:
    if not cert or not key:
        raise SystemExit("--https and --tcps need --cert and --key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def remember_name(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.sni_name = name  # for /echo

    ctx.sni_callback = remember_name
    return ctx


async def main(args) -> None:
    STATUS[0] = args.status
    loop = asyncio.get_running_loop()
    log = open(args.log, "a") if args.log else None
    tls = _server_context(args.cert, args.key) if args.https or args.tcps else None
    servers = []
    for spec in args.http:
        host, port = _addr(spec)
        servers.append(await loop.create_server(lambda: HttpOrigin(args.id, log), host, port, reuse_address=True))
    for spec in args.https:
        host, port = _addr(spec)
        servers.append(await loop.create_server(lambda: HttpOrigin(args.id, log), host, port, reuse_address=True,
                                                ssl=tls))
    for spec in args.tcp:
        host, port = _addr(spec)
        servers.append(await loop.create_server(TcpEcho, host, port, reuse_address=True))
    for spec in args.tcps:
        host, port = _addr(spec)
        servers.append(await loop.create_server(TcpEcho, host, port, reuse_address=True, ssl=tls))
    for spec in args.hang:
        host, port = _addr(spec)
        servers.append(await loop.create_server(Hang, host, port, reuse_address=True))
    for spec in args.udp:
        host, port = _addr(spec)
        await loop.create_datagram_endpoint(lambda: UdpEcho(args.id), local_addr=(host, port))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--http", action="append", default=[])
    parser.add_argument("--tcp", action="append", default=[])
    parser.add_argument("--udp", action="append", default=[])
    parser.add_argument("--hang", action="append", default=[])
    parser.add_argument("--https", action="append", default=[], help="the HTTP paths over TLS")
    parser.add_argument("--tcps", action="append", default=[], help="the TCP echo over TLS")
    parser.add_argument("--cert", help="PEM certificate chain for --https and --tcps")
    parser.add_argument("--key", help="PEM private key for --https and --tcps")
    parser.add_argument("--status", type=int, default=0, help="answer every HTTP request with this status")
    parser.add_argument("--log")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)

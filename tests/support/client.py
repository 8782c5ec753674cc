"""A raw HTTP/1.1 client for tests: bytes on the wire, not what a client
library makes of them."""

from __future__ import annotations

import json
import socket


class Response:
    def __init__(self, status: int, head: bytes, headers: list[tuple[str, str]], body: bytes,
                 interim: list[bytes]) -> None:
        self.status, self.head, self.headers, self.body, self.interim = status, head, headers, body, interim

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def one(self, name: str) -> str | None:
        values = self.get(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def echo(self) -> dict:
        """The /echo body, with the request headers the backend received
        as a list of (lowercase name, value)."""
        data = json.loads(self.body)
        data["headers"] = [(n.lower(), v) for n, v in data["headers"]]
        return data

    def __repr__(self) -> str:
        return f"Response({self.head!r}, {len(self.body)} body bytes)"


def _headers(head: bytes) -> list[tuple[str, str]]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            out.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
    return out


class Client:
    """A raw client connection from this test's own address."""

    def __init__(self, ip: str, port: int = 8080, timeout: float = 10) -> None:
        self.sock = socket.create_connection((ip, port), timeout=timeout, source_address=(ip, 0))
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed; unread: {self.buf[:200]!r}")
        self.buf += chunk

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self.fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def head(self) -> tuple[int, bytes]:
        head = self.until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), head
        return int(head[9:12]), head

    def response(self, method: bytes = b"GET") -> Response:
        """Read one response (interim 1xx ones are collected on the way)."""
        interim = []
        while True:
            status, head = self.head()
            if 100 <= status < 200 and status != 101:
                interim.append(head)
                continue
            break
        headers = _headers(head)
        names = [n for n, _ in headers]
        if method == b"HEAD" or status in (101, 204, 304):
            body = b""
        elif "transfer-encoding" in names:
            assert dict(headers)["transfer-encoding"].lower() == "chunked", head
            body = self.chunked_body()
        elif "content-length" in names:
            body = self.exactly(int(dict(headers)["content-length"]))
        else:
            body = self.read_to_close()
        return Response(status, head, headers, body, interim)

    def chunked_body(self) -> bytes:
        parts = []
        while True:
            line = self.until(b"\r\n")[:-2]
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while self.until(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.exactly(size))
            assert self.exactly(2) == b"\r\n"

    def read_to_close(self) -> bytes:
        while True:
            try:
                self.fill()
            except EOFError:
                out, self.buf = self.buf, b""
                return out

    def request(self, method: str = "GET", path: str = "/", headers: dict | None = None, body: bytes = b"",
                host: str = "example.test") -> Response:
        self.send(build(method, path, headers, body, host))
        return self.response(method.encode())

    def closed_within(self, seconds: float) -> bool:
        """True when the server closes (EOF or reset) within `seconds`,
        with nothing more sent; False when it was still open then."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        assert data == b"", data
        return True


def build(method: str = "GET", path: str = "/", headers: dict | None = None, body: bytes = b"",
          host: str | None = "example.test") -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(ip: str, data: bytes, timeout: float = 5) -> tuple[Response, bool]:
    """Send bytes on a new connection; (the response, whether the server
    then closed the connection within a second)."""
    with Client(ip, timeout=timeout) as c:
        c.send(data)
        r = c.response()
        return r, c.closed_within(1)

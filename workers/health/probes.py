"""Probes: one check of one backend, each bounded by the check's timeout.

- tcp: connect, then close.
- http: a request (method, path, Host) on a kept-alive connection where the
  backend allows it; healthy when the status is in expect_status and, if set,
  the body contains expect_body. The response is framed by llhttp.
- custom: the command runs with LBC_BACKEND_ADDRESS, LBC_BACKEND_PORT and
  LBC_BACKEND_ID in its environment; exit 0 is healthy; it is killed when the
  timeout passes.

For a pool that speaks TLS to its backends (its `tls`), tcp and http probes
do too, with the workers' client context and server name, so a backend whose
certificate does not verify fails its checks as it fails requests.

A probe returns (passed, latency in ms, error text); it never raises.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import ssl
import time

import httptools

from lbc.table import HealthCheck

MAX_BODY = 64 * 1024  # of a check's response body that expect_body looks at


class _HttpProbe(asyncio.Protocol):
    """One kept-alive connection for http checks of one backend."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None
        self.closed = False
        self.parser = None
        self.body = bytearray()
        self.keep = False
        self.head_only = False  # HEAD: the response ends with its head, whatever it announces

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self, request: bytes, head_only: bool) -> asyncio.Future:
        self.done = asyncio.get_running_loop().create_future()
        self.parser = httptools.HttpResponseParser(self)
        self.body.clear()
        self.head_only = head_only
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            self.transport.abort()  # unsolicited bytes: drop the connection
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.done.set_exception(ConnectionError(f"bad response: {e}"))

    def on_headers_complete(self) -> None:
        if self.head_only and not self.done.done():
            self.keep = False  # llhttp would wait for the announced body: start afresh next time
            self.done.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if len(self.body) < MAX_BODY:
            self.body += body

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.keep = self.parser.should_keep_alive()
            self.done.set_result(self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed before a response"))


class Prober:
    """Runs the probes of one backend; keeps its http connection between them."""

    def __init__(self, check: HealthCheck, address: str, port: int, backend_id: str, path: str | None,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        self.check = check
        self.address = address
        self.port = port
        self.backend_id = backend_id
        self.path = path or check.path
        self.tls = tls
        self.server_name = server_name if tls else None
        self._conn: _HttpProbe | None = None

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.transport.close()
        self._conn = None

    async def probe(self, address: str) -> tuple[bool, float, str]:
        """Probe the backend at `address` (its resolved address)."""
        if address != self.address:
            self.close()  # the name resolves elsewhere now: a new connection
            self.address = address
        start = time.monotonic()
        timeout = self.check.timeout_ms / 1000
        try:
            if self.check.type == "tcp":
                ok, why = await asyncio.wait_for(self._tcp(), timeout)
            elif self.check.type == "http":
                ok, why = await asyncio.wait_for(self._http(), timeout)
            else:
                ok, why = await self._custom(timeout)
        except TimeoutError:
            self.close()
            ok, why = False, f"timed out after {timeout:g}s"
        except ssl.SSLError as e:  # before OSError, its base
            self.close()
            ok, why = False, f"TLS: {getattr(e, 'verify_message', None) or e.reason or e}"
        except OSError as e:
            self.close()
            ok, why = False, e.strerror or str(e)
        except ConnectionError as e:
            self.close()
            ok, why = False, str(e)
        return ok, (time.monotonic() - start) * 1000, why

    async def _tcp(self) -> tuple[bool, str]:
        _, writer = await asyncio.open_connection(self.address, self.port, ssl=self.tls,
                                                  server_hostname=self.server_name)
        writer.close()
        return True, ""

    async def _http(self) -> tuple[bool, str]:
        check = self.check
        conn = self._conn
        if conn is None or conn.closed:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_HttpProbe, self.address, self.port, ssl=self.tls,
                                                   server_hostname=self.server_name)
            self._conn = conn
        host = check.host or (f"[{self.address}]" if ":" in self.address else self.address)
        request = (f"{check.method} {self.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbc-health\r\n"
                   "Accept: */*\r\n\r\n").encode()
        status = await conn.start(request, head_only=check.method == "HEAD")
        if not conn.keep:
            self.close()
        if not any(lo <= status <= hi for lo, hi in check.expect_status):
            return False, f"status {status}"
        if check.expect_body and check.expect_body.encode() not in conn.body:
            return False, "expected body text missing"
        return True, ""

    async def _custom(self, timeout: float) -> tuple[bool, str]:
        env = {**os.environ, "LBC_BACKEND_ADDRESS": self.address, "LBC_BACKEND_PORT": str(self.port),
               "LBC_BACKEND_ID": self.backend_id}
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(self.check.command), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            await proc.wait()
            return False, f"command timed out after {timeout:g}s"
        return (True, "") if code == 0 else (False, f"command exited {code}")

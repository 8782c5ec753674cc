"""HTTP/1.1 reverse proxying over asyncio Protocols (uvloop) with httptools.

One HttpClient per client connection, one Upstream per backend connection;
idle Upstreams are pooled per backend and reused (keep-alive both sides).

The client connection's state machine:

    HEAD ──head complete──▶ CONNECTING ──upstream ready──▶ FORWARDING
     ▲                          │ (pooled upstream: straight to FORWARDING)
     │                          ▼
     └──response done, keep-alive── FORWARDING ──101──▶ TUNNEL
                                    any error ──▶ CLOSED

- HEAD: bytes accumulate until CRLFCRLF. The first byte of a head starts an
  absolute deadline (client_header timeout, 408) that more bytes never
  extend (for a pipelined head already buffered, it starts when the
  response before it is done). An empty buffer between requests is idle
  (idle timeout, closed quietly). A bare LF or CR gets 400 as soon as it
  arrives, without waiting for the rest of the head. The head goes through
  llhttp (a fresh parser per request, fed the head only, so pipelined bytes
  and bodies never desynchronize it) and then h1.parse_request_head.
- The request captures the live Router when its head completes; the next
  request on the same connection takes whatever is live then. A reload never
  closes a client connection.
- Bodies stream both ways with backpressure: a full upstream write buffer
  pauses reading from the client and a full client buffer pauses reading
  from the backend. Request bodies are counted (Content-Length) or decoded
  and re-framed (chunked); response bytes pass through unparsed while a
  per-response llhttp parser finds where the response ends. A connection
  returned to the pool reads again, whatever the last client's pace was.
- Pipelined requests wait in the buffer (reading pauses) until the response
  before them is done, so responses stay in order. Requests lbc answers
  itself (404, 503, ...) are taken one after the other in a loop, not by
  recursion; while the client does not read its answers, the loop stops
  and so does reading from it.
- An Upgrade request whose backend answers 101 turns the connection into a
  TUNNEL; bytes the client sent behind the head go through it first.
- Timeouts are deadlines on the connection, checked by the worker's sweep
  twice a second (no timer per read). While a request body streams to
  its backend, each read of it moves the deadline to client_body from now
  (408, or a cut once the response began); once the whole request is sent,
  the backend has the response timeout.
- An error answered while a backend connection carries part of the request
  drops that connection (it is in an unknown state); an error after part of
  the response reached the client cuts the client off, as nothing else can
  follow a partial response.
- A request that fails before the backend sent any byte of a response is
  retried once on a fresh connection when that is safe: always when the
  connection failed to open, and for idempotent methods when a reused
  pooled connection turned out to be closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING

import httptools
from lbc_workers.proxy import h1, tls
from lbc_workers.proxy.accesslog import Where
from lbc_workers.proxy.chunked import ChunkedDecoder, ChunkError
from lbc_workers.proxy.store import pick_remembered, remembered_here
from lbc_workers.sticky import strip_cookie

if TYPE_CHECKING:
    from lbc_workers.proxy.router import BackendRuntime, CompiledRoute, ListenerRuntime, PoolRuntime
    from lbc_workers.proxy.worker import Worker
    from lbc_workers.sticky import Affinity

HEAD, CONNECTING, FORWARDING, TUNNEL, CLOSED = range(5)
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
MAX_PENDING = 256 * 1024  # body bytes buffered while connecting, before reading pauses
MAX_RESPONSE_HEAD = 64 * 1024
MAX_IDLE_PER_BACKEND = 64
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
# What a plain response (h1.plain_response_length) leaves for the rest of the cycle: only read.
log = logging.getLogger("lbc.worker")
_LATER = object()  # a pick that waits on the sticky store
_NOWHERE = Where("-", -1, None)
_PLAIN = h1.Response(200, h1.LENGTH, 0, True, False, b"", {}, (), b"keep-alive")


class _HeadParse:
    """llhttp callbacks for one request head: only the URL is needed."""

    __slots__ = ("url",)

    def __init__(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url


class _ChunkedEnd:
    """llhttp finding where a chunked response body ends (the bytes pass
    through as they came; only the end matters). Fed the head first so that
    it knows the framing."""

    __slots__ = ("done", "parser")

    def __init__(self, head: bytes) -> None:
        self.done = False
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(head)

    def on_message_complete(self) -> None:
        self.done = True


class Upstream(asyncio.Protocol):
    """A connection to a backend. Between requests it sits in the backend's
    idle list; while a request uses it, `owner` is that client. It keeps the
    pool's TLS settings it was opened with (`ssl`, `sni`): after a reload
    that changes them it is not reused."""

    __slots__ = ("worker", "backend", "ssl", "sni", "transport", "owner", "closed", "idle_since", "read_paused")

    def __init__(self, worker: Worker, backend: BackendRuntime, pool: PoolRuntime) -> None:
        self.worker = worker
        self.backend = backend
        self.ssl = pool.ssl  # contexts are cached by settings: the same object while they stay
        self.sni = pool.sni
        self.transport: asyncio.Transport | None = None
        self.owner = None
        self.closed = False
        self.idle_since = 0.0
        self.read_paused = False  # by its client's full write buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.conns.add(self)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            self.transport.abort()  # bytes nobody asked for: the connection is unusable
        else:
            owner.upstream_data(data)

    def eof_received(self) -> bool:
        owner = self.owner
        if owner is not None:
            return owner.upstream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        backend = self.backend
        backend.conns.discard(self)
        if self.owner is not None:
            self.owner.upstream_lost(self)
        else:
            try:
                backend.idle.remove(self)
            except ValueError:
                pass

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_reading("upstream")
            self.owner.body_stalled_by_backend(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_reading("upstream")
            self.owner.body_stalled_by_backend(False)


def release(up: Upstream, reusable: bool) -> None:
    backend = up.backend
    up.owner = None
    if reusable and backend.removed_at is None and backend.enabled and not up.closed:
        idle = backend.idle
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            idle.pop(0).transport.close()
        up.idle_since = up.worker.now
        # Reading may be paused for the slow client this response went to;
        # an idle connection reads again (the next response, or the close).
        if up.read_paused:
            up.read_paused = False
            up.transport.resume_reading()
        idle.append(up)
    elif not up.closed:
        up.transport.close()


class HttpClient(asyncio.Protocol):
    """One client connection to an http listener."""

    __slots__ = (
        "worker", "key", "listener", "transport", "peer", "state", "buf", "deadline", "deadline_status",
        "paused", "closing", "eof", "req", "pool", "backend", "up", "reused", "attempts", "pending",
        "pending_bytes", "body_left", "chunks", "req_done", "resp", "resp_buf", "resp_started",
        "resp_left", "resp_end", "resp_bytes", "router", "tunnel_eof", "in_heads", "more", "head_cb", "tried",
        "conn_headers", "is_tls", "set_cookie", "sent_at", "t0", "status", "ut", "route", "served_by",
    )

    def __init__(self, worker: Worker, key) -> None:
        self.worker = worker
        self.key = key
        self.listener: ListenerRuntime | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.state = HEAD
        self.buf = bytearray()
        self.deadline = 0.0
        self.deadline_status = 0  # 0: close quietly; else the error status to send
        self.paused: set[str] = set()
        self.closing = False  # close after the current response
        self.eof = False
        self.req: h1.Request | None = None
        self.up: Upstream | None = None
        self.backend: BackendRuntime | None = None
        self.tunnel_eof = 0
        self.req_done = True
        self.resp_started = False
        self.in_heads = False  # _heads is running (requests answered inside it loop, not recurse)
        self.more = False
        self.head_cb = _HeadParse()
        self.conn_headers = b""
        self.resp_buf = b""
        self.pending = []
        self.chunks = None
        self.set_cookie = b""  # a stickiness cookie for this request's response
        self.t0 = self.ut = 0.0
        self.status = 0
        self.route: CompiledRoute | None = None
        self.served_by: BackendRuntime | None = None  # the backend tried last, for the access log

    # -- asyncio callbacks: client side ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        self.listener = self.worker.router.listeners.get(self.key)
        self.is_tls = transport.get_extra_info("sslcontext") is not None
        if self.listener is not None and self.listener.subject_header:
            subject = tls.subject_of(transport.get_extra_info("peercert"))
            if subject:  # verified by OpenSSL during the handshake
                self.conn_headers = self.listener.subject_header + b": " + subject.encode("utf-8", "replace") + b"\r\n"
        self.worker.clients.add(self)
        self.worker.connections_opened += 1
        # Before the first byte, a silent connection gets the header timeout.
        self.deadline = self.worker.now + (self.listener.header_s if self.listener else 1.0)
        self.deadline_status = 408

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == HEAD:
            if not self.buf:
                # The common case: exactly one whole head, no copy into the buffer.
                if data.find(b"\r\n\r\n") == len(data) - 4 and data[:2] != b"\r\n" and not self.in_heads:
                    self._start(data)
                    return
                self.deadline = self.worker.now + self.listener.header_s
                self.deadline_status = 408
            self.buf += data
            self._heads()
        elif state == TUNNEL:
            self.up.transport.write(data)
            self.deadline = self.worker.now + self.listener.idle_s
        elif not self.req_done:
            self._body(data)
        else:
            # Pipelined: the next request waits until this response is done.
            self.buf += data
            if len(self.buf) > self.listener.rules.max_head:
                self.pause_reading("pipeline")

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == TUNNEL:
            self.tunnel_eof |= 1
            if self.up is not None and not self.up.closed and self.up.transport.can_write_eof():
                self.up.transport.write_eof()
            return self.tunnel_eof != 3
        if (self.state == HEAD and not self.buf) or self.is_tls:
            return False  # closes (a TLS connection cannot half-close: it closes whatever we answer)
        if self.state in (CONNECTING, FORWARDING) and not self.req_done and self.resp is None:
            # The body can never be finished, and no response began: the
            # request is abandoned (400, as NGINX logs it), not held open to
            # the body timeout.
            self._respond_error(400, close=True)
        return True  # finish the response in flight, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.worker.clients.discard(self)
        up = self.up
        if up is not None:
            self.up = None
            up.owner = None
            if not up.closed:
                up.transport.abort()  # its response was not read to the end
        self._release_backend()

    def pause_writing(self) -> None:
        # The client does not read: stop reading from it (its next requests
        # wait) and from its backend.
        self.pause_reading("writing")
        if self.up is not None and not self.up.closed:
            self.up.read_paused = True
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.resume_reading("writing")
        if self.up is not None and not self.up.closed:
            self.up.read_paused = False
            self.up.transport.resume_reading()
        elif self.state == HEAD and self.buf:
            self._heads()

    def body_stalled_by_backend(self, stalled: bool) -> None:
        """The backend stops (or starts again) taking the request body: while
        it does not, the client is not read, and the wait is the backend's
        (response timeout), not the client's (client_body)."""
        if not self.req_done and self.state == FORWARDING:
            if stalled:
                self.deadline = self.worker.now + self.listener.response_s
                self.deadline_status = 504
            else:
                self.deadline = self.worker.now + self.listener.body_s
                self.deadline_status = 408

    def pause_reading(self, why: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume_reading(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and self.state != CLOSED:
                self.transport.resume_reading()

    # -- request heads -----------------------------------------------------------

    def _heads(self) -> None:
        """Start the next requests whose heads are complete. A request
        answered at once (_next_request calls back here) sets `more`, and
        the loop takes the next one: thousands of pipelined 404s do not
        recurse thousands deep."""
        if self.in_heads:
            self.more = True
            return
        self.in_heads = True
        try:
            self.more = True
            while self.more and self.state == HEAD and "writing" not in self.paused:
                self.more = False
                self._head()
        finally:
            self.in_heads = False

    def _head(self) -> None:
        """Start the next request if its head is complete."""
        buf = self.buf
        while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        listener = self.listener
        rules = listener.rules
        if end < 0:
            if not buf:
                self.deadline = self.worker.now + listener.idle_s
                self.deadline_status = 0
                return
            first = buf.find(b"\r\n")
            if (first < 0 and len(buf) > rules.max_request_line) or first > rules.max_request_line:
                self._reject(414, "request line too long")
            elif len(buf) > rules.max_head:
                self._reject(431, "request head too large")
            else:
                # A bare LF (or a CR not followed by LF) never becomes a valid
                # head: say so now rather than at the header timeout.
                crlf = buf.count(b"\r\n")
                if buf.count(b"\n") != crlf or buf.count(b"\r") - (buf[-1:] == b"\r") != crlf:
                    self._reject(400, "bad line ending")
            return
        raw = bytes(buf[: end + 4])
        del buf[: end + 4]
        self._start(raw)

    def _start(self, raw: bytes) -> None:
        """A whole request head: check it, route it, send it on."""
        # The live router, and this listener in it; the request keeps both.
        router = self.worker.router
        listener = router.listeners.get(self.key)
        if listener is None or listener.protocol not in ("http", "https"):
            self.transport.close()  # the listener was removed: close between requests
            return
        self.listener = listener
        cb = self.head_cb
        cb.url = b""
        parser = httptools.HttpRequestParser(cb)
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade:
            pass  # Upgrade requests are handled from the head below
        except httptools.HttpParserError:
            self._reject(400, "malformed request")
            return
        method = parser.get_method()
        if method == b"CONNECT":
            self._reject(400, "CONNECT is not supported")
            return
        worker = self.worker
        try:
            req = h1.parse_request_head(raw, method, cb.url, _VERSIONS.get(parser.get_http_version(), b"?"),
                                        listener.rules, self.peer, worker.next_request_id, self.conn_headers)
        except h1.HeadError as e:
            self._reject(e.status, e.reason)
            return
        worker.requests += 1
        self.req = req
        self.router = router
        self.t0 = time.monotonic()
        self.ut = -1.0
        self.route = None
        self.served_by = None
        if not req.keep_alive:
            self.closing = True
        framing = req.framing
        if framing == h1.NO_BODY:
            self.req_done = True
        else:
            max_body = listener.spec.limits.max_body
            if max_body and framing == h1.LENGTH and req.length > max_body:
                self._reject(413, "request body too large")
                return
            self.body_left = req.length if framing == h1.LENGTH else 0
            self.chunks = ChunkedDecoder() if framing == h1.CHUNKED else None
            self.req_done = False
        self.pending = []  # what was sent, kept for a retry (None once a body streams through)
        self.pending_bytes = 0
        self.attempts = 0
        self.resp = None
        self.resp_bytes = 0
        self.set_cookie = b""
        if listener.spec.redirect_https:
            self._redirect(req, listener.spec.redirect_https)
            return
        route = listener.route(req)
        if route is None:
            self._respond_error(404)
            return
        self.route = route
        self.pool = route.pool
        self.state = CONNECTING
        self.deadline = worker.now + listener.connect_s + listener.response_s
        self.deadline_status = 504
        if self.buf and not self.req_done:
            data = bytes(self.buf)
            self.buf.clear()
            self._body(data)
            if self.state == CLOSED:
                return
        self._dispatch()

    def _redirect(self, req: h1.Request, port: int) -> None:
        """redirect_to_https: 301 to the same host and target over https."""
        host = req.host if b":" not in req.host else b"[" + req.host + b"]"
        authority = host if port == 443 else host + b":%d" % port
        location = b"https://" + authority + req.target
        close = not req.keep_alive or not self.req_done
        response = (b"HTTP/1.1 301 Moved Permanently\r\nLocation: " + location +
                    b"\r\nContent-Length: 0\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
        self.transport.write(response)
        self._answered(301, len(response))
        if close:
            self.state = CLOSED
            self.transport.close()
        else:
            self._next_request()

    def _reject(self, status: int, reason: str) -> None:
        self.worker.rejected += 1
        self._respond_error(status, close=True)

    # -- request bodies ------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        """Body bytes from the client: forward (or hold while connecting);
        bytes past the end of the body belong to the next request."""
        if self.chunks is not None:
            try:
                out, used = self.chunks.feed(data)
            except ChunkError:
                self._respond_error(400, close=True)
                return
            max_body = self.listener.spec.limits.max_body
            if max_body and self.chunks.total > max_body:
                self._respond_error(413, close=True)
                return
            rest = data[used:]
            done = self.chunks.done
        else:
            n = self.body_left
            out, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
            self.body_left -= len(out)
            done = self.body_left == 0
        # The deadline first: a write that fills the backend's buffer moves it
        # to the backend's (body_stalled_by_backend).
        if done:
            self.req_done = True
            if self.state == FORWARDING:  # all sent: the backend's turn
                self.deadline = self.worker.now + self.listener.response_s
                self.deadline_status = 504
        elif self.state == FORWARDING:  # the longest gap before the next read of the body
            self.deadline = self.worker.now + self.listener.body_s
            self.deadline_status = 408
        if out:
            self._to_upstream(out)
        if rest:
            self.buf += rest
            if len(self.buf) > self.listener.rules.max_head:
                self.pause_reading("pipeline")

    def _to_upstream(self, data: bytes) -> None:
        up = self.up
        if up is not None and self.state == FORWARDING:
            up.transport.write(data)
            self.pending = None  # sent without a copy: no replay
        else:
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > MAX_PENDING:
                self.pause_reading("connecting")

    # -- upstream -------------------------------------------------------------------

    def _dispatch(self) -> None:
        pool: PoolRuntime = self.pool
        if pool.affinity is None:
            backend = pool.pick_for(self.req, self.peer)
        else:
            backend = self._sticky_pick(pool, pool.affinity)
            if backend is _LATER:
                return
        self._use(backend)

    def _sticky_pick(self, pool: PoolRuntime, affinity: Affinity):
        """The backend of a sticky pool (see workers/sticky.py), or _LATER
        when the store is asked first."""
        req = self.req
        if affinity.cookie is not None:
            backend = None
            if b"\r\ncookie:" in req.low:
                backend = affinity.from_cookie(h1.header_values(req.raw, req.low, b"cookie"), pool.members, time.time())
                req.head = strip_cookie(req.head, affinity.cookie)  # the backend never sees it
            if backend is None:
                backend = pool.pick_for(req, self.peer)
                if backend is not None:
                    self.set_cookie = affinity.set_cookie(backend.id, time.time(), self.is_tls)
            return backend
        key = self.peer if affinity.mode == "source_ip" else req.header(affinity.header)
        if not key:
            return pool.pick_for(req, self.peer)
        if affinity.store is not None:
            store = self.worker.store(affinity.store)
            backend = remembered_here(store, affinity, pool, key)
            if backend is not None:
                return backend
            if store.available():
                self.worker.loop.create_task(self._remembered(req, pool, affinity, store, key))
                return _LATER
        return affinity.hashed(pool.members, key)

    async def _remembered(self, req: h1.Request, pool: PoolRuntime, affinity: Affinity, store, key: bytes) -> None:
        try:
            backend = await pick_remembered(store, affinity, pool, key)
        except Exception:  # noqa: BLE001 - a task's edge: the request must go on whatever the store did
            log.exception("sticky store lookup failed")
            backend = affinity.hashed(pool.members, key)
        if self.req is req and self.state == CONNECTING:  # else the client went away meanwhile
            self._use(backend)

    def _use(self, backend: BackendRuntime | None) -> None:
        pool = self.pool
        self.served_by = backend
        if backend is None:
            if pool.members:
                # Every backend is at max_connections: wait for a free one,
                # up to the connect timeout (the sweep answers 503 after it).
                self.deadline = self.worker.now + self.listener.connect_s
                self.deadline_status = 503
                self.worker.wait_for_backend(pool.name, self)
            else:
                self._respond_error(503)
            return
        self.backend = backend
        backend.active += 1
        backend.requests += 1
        self.worker.dirty.add(backend)
        idle = backend.idle
        while idle:
            up = idle.pop()
            if not up.closed:
                if up.ssl is pool.ssl and up.sni == pool.sni:
                    self._attach(up, reused=True)
                    return
                up.transport.close()  # opened with TLS settings a reload changed
        self.worker.loop.create_task(self._connect(backend))

    async def _connect(self, backend: BackendRuntime) -> None:
        worker = self.worker
        pool = self.pool
        try:
            _, up = await asyncio.wait_for(
                worker.loop.create_connection(lambda: Upstream(worker, backend, pool), backend.connect_address, backend.port,
                                              ssl=pool.ssl, server_hostname=(pool.sni or backend.address)
                                              if pool.ssl else None),
                self.listener.connect_s,
            )
        except (TimeoutError, OSError, ssl.SSLError) as e:
            if self.state != CONNECTING or self.backend is not backend:
                return
            self._upstream_failed(504 if isinstance(e, asyncio.TimeoutError) else 502, sent=False)
            return
        if self.state != CONNECTING or self.backend is not backend:
            release(up, reusable=True)  # the client went away meanwhile
            return
        self._attach(up, reused=False)

    def waiting_for_backend(self) -> bool:
        return self.state == CONNECTING and self.backend is None and self.up is None

    def retry_dispatch(self) -> None:
        self.deadline = self.worker.now + self.listener.connect_s + self.listener.response_s
        self.deadline_status = 504
        self._dispatch()

    def _attach(self, up: Upstream, reused: bool) -> None:
        self.up = up
        self.reused = reused
        self.sent_at = time.monotonic()
        up.owner = self
        self.state = FORWARDING
        if self.req_done:
            self.deadline = self.worker.now + self.listener.response_s
            self.deadline_status = 504
        else:  # the rest of the body is the client's to send
            self.deadline = self.worker.now + self.listener.body_s
            self.deadline_status = 408
        write = up.transport.write
        write(self.req.head)
        for piece in self.pending:
            write(piece)
        if not self.req_done:
            self.pending = None  # the rest streams straight through: no replay
        if self.paused:
            self.resume_reading("connecting")

    def _upstream_failed(self, status: int, sent: bool) -> None:
        """The backend connection failed before any byte of a response. Try
        again (up to the pool's `retries`), on a fresh connection to another
        backend when there is one, when the whole request can be replayed and
        sending it twice is safe."""
        failed = self.backend
        pool = self.pool
        self.worker.backend_failed(pool, failed)
        self._release_backend()
        self.up = None
        self.tried = (*self.tried, failed) if self.attempts else (failed,)
        if self.attempts < pool.spec.retries and self.pending is not None and (
            not sent or self.req.method in IDEMPOTENT
        ):
            self.attempts += 1
            self.state = CONNECTING
            backend = pool.pick_for(self.req, self.peer)
            for _ in range(len(pool.members)):
                if backend not in self.tried:
                    break
                backend = pool.balancer.pick(pool.members, None)  # the hash's pick failed: go round
            if backend is not None:
                failed.retries += 1
                self.backend = self.served_by = backend
                backend.active += 1
                backend.requests += 1
                self.worker.dirty.add(backend)
                if pool.affinity is not None and pool.affinity.cookie is not None:  # name where it went
                    self.set_cookie = pool.affinity.set_cookie(backend.id, time.time(), self.is_tls)
                self.worker.loop.create_task(self._connect(backend))
                return
        self._respond_error(status)

    def upstream_data(self, data: bytes) -> None:
        if self.state == TUNNEL:
            self.deadline = self.worker.now + self.listener.response_s
            self.transport.write(data)
            return
        if self.deadline_status != 408:  # 408: the client's body deadline (client_body) runs
            self.deadline = self.worker.now + self.listener.response_s
        self.resp_bytes += len(data)
        if self.resp is None:
            self._response_head(self.resp_buf + data if self.resp_buf else data)
        else:
            self._response_body(data, b"")

    def _response_head(self, buf: bytes) -> None:
        """The response head (after any 1xx interim ones) is complete in
        `buf`: frame it, lower it, and send it with the first body bytes in
        one write."""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self._backend_broken(502)
                else:
                    self.resp_buf = buf
                return
            if buf[9:10] == b"1" and buf[9:12] != b"101":
                self.transport.write(buf[: end + 4])  # interim (100 Continue, 103): pass on, wait for the final one
                buf = buf[end + 4 :]
                continue
            break
        self.resp_buf = b""
        self.ut = time.monotonic() - self.sent_at
        self.status = int(buf[9:12]) if buf[9:12].isdigit() else 0
        self.backend.timed_response(self.ut, buf[9])
        self.worker.dirty.add(self.backend)
        req = self.req
        if len(buf) - end - 4 == h1.plain_response_length(buf[: end + 4], req.method, self.listener.response_rules) \
                and req.version == b"1.1" and not self.closing and self.req_done and not self.worker.draining \
                and self.router is self.worker.router and not self.set_cookie:
            # The common case: the whole response in one read, passed on unchanged.
            self.resp = _PLAIN
            self.resp_started = True
            if buf[9:10] == b"5":
                self.worker.backend_failed(self.pool, self.backend)
            else:
                self.backend.consecutive_failures = 0
            self.transport.write(buf)
            self._response_done()
            return
        raw, rest = buf[: end + 4], buf[end + 4 :]
        try:
            resp = h1.parse_response_head(raw, req.method, req.upgrade, self.listener.response_rules)
        except h1.HeadError as e:
            self._backend_broken(e.status)
            return
        self.resp = resp
        self.resp_started = True
        if resp.status >= 500:
            self.worker.backend_failed(self.pool, self.backend)
        else:
            self.backend.consecutive_failures = 0
        if resp.framing == h1.CLOSE_DELIMITED or not self.req_done or self.worker.draining or (
            self.router is not self.worker.router and self.key not in self.worker.router.listeners
        ):
            self.closing = True
        if resp.upgrade:
            connection = None
        elif self.closing:
            connection = b"close"
        elif req.version == b"1.0":
            connection = b"keep-alive"
        else:
            connection = None
        head = h1.lower_response(resp, self.listener.response_rules, connection, self.set_cookie)
        if resp.upgrade:
            self.transport.write(head + rest)
            self._answered(101, len(head) + len(rest))
            self.state = TUNNEL
            self.deadline = self.worker.now + self.listener.idle_s
            self.deadline_status = 0
            if self.buf:  # sent behind the head, before the 101: the tunnel's first bytes
                self.up.transport.write(bytes(self.buf))
                self.buf.clear()
            self.resume_reading("pipeline")
            return
        if resp.framing == h1.LENGTH:
            if head is raw and len(rest) == resp.length:
                # The common case: the whole response in one read, passed on unchanged.
                self.transport.write(buf)
                self._response_done()
                return
            self.resp_left = resp.length
        elif resp.framing == h1.CHUNKED:
            try:
                self.resp_end = _ChunkedEnd(raw)
            except httptools.HttpParserError:
                self._backend_broken(502)
                return
        self._response_body(rest, head)

    def _response_body(self, data: bytes, head: bytes) -> None:
        """Body bytes (after `head`, when the head goes in the same write)."""
        framing = self.resp.framing
        if framing == h1.LENGTH:
            left = self.resp_left
            if len(data) < left:
                self.resp_left = left - len(data)
                self.transport.write(head + data if head else data)
                return
            if len(data) > left:
                self.resp.keep_alive = False  # bytes past the response: the backend is confused
                data = data[:left]
            self.resp_left = 0
        elif framing == h1.CHUNKED:
            try:
                self.resp_end.parser.feed_data(data)
            except httptools.HttpParserError:
                self._backend_broken(None if self.resp_started and not head else 502)
                return
            if not self.resp_end.done:
                self.transport.write(head + data if head else data)
                return
        elif framing == h1.CLOSE_DELIMITED:
            self.transport.write(head + data if head else data)
            return  # until the backend closes
        elif data:  # NO_BODY (HEAD, 204, 304) with bytes after it: the backend is confused
            self.resp.keep_alive = False
            data = b""
        self.transport.write(head + data if head else data)
        self._response_done()

    def upstream_eof(self) -> bool:
        if self.state == TUNNEL:
            self.tunnel_eof |= 2
            if self.transport.can_write_eof():
                self.transport.write_eof()
            return self.tunnel_eof != 3
        return False

    def upstream_lost(self, up: Upstream) -> None:
        if up is not self.up:
            return
        if self.state == TUNNEL:
            self.up = None
            self._release_backend()
            self.transport.close()
        elif self.resp is None:
            if self.resp_bytes:  # part of a head: nothing to retry safely
                self._backend_broken(502)
            else:
                self._upstream_failed(502, sent=True)
        elif self.resp.framing == h1.CLOSE_DELIMITED:
            self._response_done()
        else:
            self._backend_broken(None)  # cut off mid-body: the client cannot be told otherwise

    def _backend_broken(self, status: int | None) -> None:
        """The backend misbehaved: drop its connection; answer `status` if
        nothing of the response reached the client yet, else cut the client."""
        self._drop_upstream()
        if self.backend is not None:
            self.worker.backend_failed(self.pool, self.backend)
        self._release_backend()
        if status is not None and not self.resp_started:
            self._respond_error(status, close=True)
        else:
            if self.req is not None and self.state != CLOSED:
                self._answered(self.status, self.resp_bytes)  # cut mid-response: logged as it began
            self.state = CLOSED
            self.transport.abort()

    def _drop_upstream(self) -> None:
        """Abort the backend connection of a request that cannot finish."""
        up = self.up
        self.up = None
        if up is not None:
            up.owner = None
            if not up.closed:
                up.transport.abort()

    def _response_done(self) -> None:
        self._answered(self.status, self.resp_bytes)
        up = self.up
        self.up = None
        if up is not None:
            release(up, reusable=self.resp.keep_alive and self.req_done and not up.closed)
        self._release_backend()
        if not self.buf and not self.paused and not self.closing and not self.eof and not self.worker.draining:
            # The common case, inline: an idle keep-alive connection.
            self.req = self.resp = self.route = None
            self.state = HEAD
            self.resp_started = False
            self.deadline = self.worker.now + self.listener.idle_s
            self.deadline_status = 0
            return
        self._next_request()

    def _release_backend(self) -> None:
        backend = self.backend
        if backend is not None:
            self.backend = None
            backend.active -= 1
            worker = self.worker
            worker.dirty.add(backend)
            if worker.waiters or backend.removed_at is not None:
                worker.backend_freed(backend)

    def _next_request(self) -> None:
        self.req = None
        self.resp = None
        self.route = None
        if self.closing or self.eof or self.worker.draining:
            self.state = CLOSED
            self.transport.close()
            return
        self.state = HEAD
        self.resp_started = False
        if not self.buf and not self.paused:
            self.deadline = self.worker.now + self.listener.idle_s  # the common case: idle keep-alive
            self.deadline_status = 0
            return
        # Bytes already buffered are the start of the next head: its deadline
        # runs from now (_head makes it the idle one when there are none).
        self.deadline = self.worker.now + self.listener.header_s
        self.deadline_status = 408
        self.resume_reading("pipeline")
        self._heads()

    # -- errors and timeouts -----------------------------------------------------------

    def _respond_error(self, status: int, close: bool = False) -> None:
        if self.state == CLOSED:
            return
        self._drop_upstream()  # it has part of this request: unusable
        self._release_backend()
        if self.resp_started:  # part of a response went out: nothing can follow it
            self._answered(self.status, self.resp_bytes)  # logged with the status the client saw begin
            self.state = CLOSED
            self.transport.abort()
            return
        req = self.req
        rid = req.request_id if req is not None else b""
        # Unread request body bytes would be taken for the next request: close.
        close = close or self.closing or self.eof or (req is not None and not self.req_done)
        response = h1.error_response(status, close, rid)
        self.transport.write(response)
        self._answered(status, len(response))
        if close:
            self.state = CLOSED
            self.transport.close()
        else:
            self._next_request()

    def _answered(self, status: int, sent: int) -> None:
        """A response went to the client: count it for its listener, log it."""
        stats = self.listener.stats if self.listener is not None else None
        if stats is not None:
            stats.answered(status, sent, time.monotonic() - self.t0 if self.req is not None else 0.0)
            self.worker.dirty.add(stats)
        if self.worker.access_log is not None:
            try:
                self._log(status, sent)
            except OSError as e:
                self.worker.drop_access_log(e)

    def _log(self, status: int, sent: int) -> None:
        req = self.req
        served = self.served_by
        where = self.route.where if self.route is not None else (
            self.listener.nowhere if self.listener is not None else _NOWHERE)
        if req is None:  # refused before it was a request (malformed, too large)
            self.worker.access_log.request(self.peer, b"-", status, sent, None, None, where, b"-", 0.0, None,
                                           self.worker.router.version if self.worker.router else "", b"")
            return
        raw = req.raw
        self.worker.access_log.request(
            self.peer, raw[: raw.find(b"\r\n")], status, sent, req.header(b"referer"), req.header(b"user-agent"),
            where, served.log_id if served else b"-", time.monotonic() - self.t0, self.ut if self.ut >= 0 else None,
            self.router.version, req.request_id)

    def on_timeout(self) -> None:
        """The sweep found this connection past its deadline."""
        state = self.state
        if state == HEAD and not self.buf or state == TUNNEL:
            self.state = CLOSED
            self.transport.close()
            if self.up is not None:
                self.up.transport.close()
        elif state == HEAD:
            self._reject(408, "request head timeout")
        elif self.deadline_status == 408:  # a request body stalled (client_body): not the backend's fault
            self._reject(408, "request body timeout")  # cuts the client off if the response began
        elif "writing" in self.paused:
            # The client has not read its response (its backend's reading is
            # paused for it) for the response timeout: cut it; not a backend
            # failure (a few slow readers must not eject a backend).
            self._respond_error(self.deadline_status or 504)
        else:
            self._backend_broken(self.deadline_status or 504)

    def idle(self) -> bool:
        return self.state == HEAD and not self.buf

    def close_if_idle(self) -> bool:
        if self.idle():
            self.state = CLOSED
            self.transport.close()
            return True
        self.closing = True
        return False

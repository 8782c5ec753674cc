"""Access logs: one line per HTTP request, each worker writing its own file
(`access-<worker>.log` in `global.access_log.directory`, default the state's
run/).

The file is written through a 64 KiB buffer and flushed by the worker's
publication tick (four times a second) and at exit, never through
supervisord's pipes: a stalled supervisord would block the worker. SIGUSR1
(`lbc reopen-logs`) reopens it, for log rotation (move the file, then
signal).

combined: NGINX's combined format, then lbc's fields:

    127.0.0.1 - - [30/Nov/2026:00:41:07 +0000] "GET /x HTTP/1.1" 200 612 "-" "curl/8.0" \
        listener=web route=0 pool=web backend=a rt=0.0012 ut=0.0009 v=5b53bba26cf3 id=0a1b2c-17

    bytes: the response's bytes as the backend sent them (head and body; lbc
    passes most through unchanged), or the size of lbc's own answer;
    rt: seconds from the request head to the end of the response; ut: from
    sending the request to the backend's response head ("-" when no backend
    answered); route: the index of the listener's route that matched;
    v: the table version that served it; id: the request id.
    Quotes and bytes outside printable ASCII in the request line, referer
    and user agent are written as \\xHH, as NGINX does.

json: the same fields, one JSON object per line.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

BUFFER = 64 * 1024
_LINE = b'%s - - [%s] "%s" %d %d "%s" "%s" %s backend=%s rt=%.4f ut=%.4f v=%s id=%s\n'
_LINE_NO_UPSTREAM = b'%s - - [%s] "%s" %d %d "%s" "%s" %s backend=%s rt=%.4f ut=- v=%s id=%s\n'
_UNSAFE = re.compile(rb'[^\x20-\x21\x23-\x5b\x5d-\x7e]')  # not printable ASCII, or " or \


def _escape(value: bytes) -> bytes:
    # A few C scans first: llhttp already refused control bytes other than tab.
    if value.isascii() and b'"' not in value and b"\\" not in value and b"\t" not in value:
        return value
    return _UNSAFE.sub(lambda m: b"\\x%02X" % m.group()[0], value)


class Where:
    """Where a request went, as its log lines say it; built once per route."""

    __slots__ = ("listener", "route", "pool", "text")

    def __init__(self, listener: str, route: int, pool: str | None) -> None:
        self.listener, self.route, self.pool = listener, route, pool
        self.text = f"listener={listener} route={route} pool={pool or '-'}".encode()


class AccessLog:
    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.json = fmt == "json"
        self._second = -1
        self._stamp = b""
        self._version = ""
        self._version_b = b""
        self.file = self._open()
        self.write = self.file.write

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return open(fd, "ab", buffering=BUFFER)

    def request(self, client: bytes, request_line: bytes, status: int, sent: int, referer: bytes | None,
                agent: bytes | None, where: Where, backend: bytes, request_s: float, upstream_s: float | None,
                table_version: str, request_id: bytes) -> None:
        """One line. `where` names the listener, route and pool (prebuilt
        per route: most of a line is the same for every request of a route)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second)).encode()
        if table_version != self._version:
            self._version, self._version_b = table_version, table_version[:12].encode()
        if self.json:
            method, _, rest = request_line.partition(b" ")
            target, _, protocol = rest.rpartition(b" ")
            self.file.write(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
                "client": client.decode(), "method": method.decode("latin-1"), "target": target.decode("latin-1"),
                "protocol": protocol.decode("latin-1"), "status": status, "bytes": sent,
                "referer": referer.decode("latin-1") if referer else None,
                "user_agent": agent.decode("latin-1") if agent else None, "listener": where.listener,
                "route": where.route, "pool": where.pool, "backend": backend.decode() if backend != b"-" else None,
                "request_time": round(request_s, 6),
                "upstream_time": round(upstream_s, 6) if upstream_s is not None else None,
                "table": self._version, "request_id": request_id.decode("latin-1"),
            }, separators=(",", ":")).encode() + b"\n")
            return
        referer = referer or b"-"
        agent = agent or b"-"
        joined = request_line + referer + agent  # one check for the three (almost always clean)
        if not joined.isascii() or b'"' in joined or b"\\" in joined or b"\t" in joined:
            request_line, referer, agent = _escape(request_line), _escape(referer), _escape(agent)
        if upstream_s is None:
            self.write(_LINE_NO_UPSTREAM % (client, self._stamp, request_line, status, sent, referer, agent, where.text,
                                            backend, request_s, self._version_b, request_id or b"-"))
        else:
            self.write(_LINE % (client, self._stamp, request_line, status, sent, referer, agent, where.text, backend,
                                request_s, upstream_s, self._version_b, request_id or b"-"))

    def flush(self) -> None:
        self.file.flush()

    def reopen(self) -> None:
        """After rotation: the old file is flushed and closed, the path opened anew."""
        self.file.close()
        self.file = self._open()
        self.write = self.file.write

    def close(self) -> None:
        self.file.close()

"""A backend that parses what it receives with h11, a strict HTTP/1.1
implementation, and logs it: each request it understood, and the protocol
error that ended a connection. Framing tests use it to check what reached the backend, not
what a lenient server would make of it."""

from __future__ import annotations

import contextlib
import socket
import threading

import h11


class Request:
    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def __repr__(self) -> str:
        return f"Request({self.method} {self.target} {self.headers} {self.body!r})"


class StrictBackend:
    def __init__(self, ip: str, port: int) -> None:
        self.sock = socket.create_server((ip, port))
        self.sock.settimeout(0.2)
        self.log: list[Request | str] = []  # every request, or "error: ...", in the order seen
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        h = h11.Connection(h11.SERVER)
        conn.settimeout(60)  # kept-alive by the proxy's pool; close() ends it
        request, body = None, b""
        try:
            while not self._stop.is_set():
                event = h.next_event()
                if event is h11.NEED_DATA:
                    data = conn.recv(65536)
                    h.receive_data(data)
                    if not data and h.their_state is h11.IDLE:
                        return
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in request.headers]
                    self.log.append(Request(request.method.decode(), request.target.decode("latin-1"), headers, body))
                    reply = b"ok\n"
                    conn.sendall(h.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(reply)))]))
                                 + h.send(h11.Data(data=reply)) + h.send(h11.EndOfMessage()))
                    if h.our_state is h11.MUST_CLOSE:
                        return
                    h.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except h11.RemoteProtocolError as e:
            self.log.append(f"error: {e}")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(6)

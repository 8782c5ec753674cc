"""Backends for the bundled example (examples/pool.yaml): four small HTTP
servers on 127.0.0.1:9101, 9102 (pool web) and 9201, 9202 (pool api), each
answering with its name. Stop with Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BACKENDS = {"web-1": 9101, "web-2": 9102, "api-1": 9201, "api-2": 9202}


def handler_for(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
            body = f"{name} answered {self.command} {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_POST = do_GET  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    return Handler


def main() -> int:
    servers = [ThreadingHTTPServer(("127.0.0.1", port), handler_for(name)) for name, port in BACKENDS.items()]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("backends up: " + ", ".join(f"{n} on 127.0.0.1:{p}" for n, p in BACKENDS.items()), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    for server in servers:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

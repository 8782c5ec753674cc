"""Open COUNT connections to HOST:PORT (from SOURCE) and hold them silent for
HOLD seconds, watching which the server closes. Prints one JSON line:
opened, failed (connect errors), closed (EOF from the server), reset, and
the seconds opening took. Run as a process of its own: each holds up to its
open-file limit.

    python tests/support/flood.py SOURCE HOST PORT COUNT HOLD
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import socket
import sys
import time


def main() -> None:
    source, host, port, count, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "failed": 0, "closed": 0, "reset": 0}
    connecting = 0
    start = time.monotonic()
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            stats["failed"] += 1
            s.close()
            continue
        sel.register(s, selectors.EVENT_WRITE, "connect")
        connecting += 1
        if connecting > 512:  # keep the SYN queue from overflowing
            connecting -= _pump(sel, stats, 0.05)
    deadline = time.monotonic() + 30
    while connecting and time.monotonic() < deadline:
        connecting -= _pump(sel, stats, 0.1)
    stats["open_seconds"] = round(time.monotonic() - start, 2)
    end = time.monotonic() + hold
    while time.monotonic() < end:
        _pump(sel, stats, 0.1)
    print(json.dumps(stats), flush=True)


def _pump(sel: selectors.BaseSelector, stats: dict, timeout: float) -> int:
    """Handle ready sockets; return how many finished connecting."""
    done = 0
    for key, _ in sel.select(timeout):
        s = key.fileobj
        if key.data == "connect":
            done += 1
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                stats["failed"] += 1
                sel.unregister(s)
                s.close()
            else:
                stats["opened"] += 1
                sel.modify(s, selectors.EVENT_READ, "open")
            continue
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            stats["reset"] += 1
            data = b""
        else:
            if not data:
                stats["closed"] += 1
        if not data:
            sel.unregister(s)
            s.close()
    return done


if __name__ == "__main__":
    main()

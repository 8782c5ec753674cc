"""A client that sends GET / to ADDRESS:PORT every INTERVAL seconds on a
new connection, printing one line per request: the time.monotonic() it
started, and the body's first line or the error. Runs until killed.

    python tests/support/vip_client.py ADDRESS PORT INTERVAL
"""

from __future__ import annotations

import http.client
import sys
import time


def main() -> None:
    address, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while True:
        start = time.monotonic()
        try:
            c = http.client.HTTPConnection(address, port, timeout=0.5)
            c.request("GET", "/")
            r = c.getresponse()
            body = r.read().decode(errors="replace").strip()
            c.close()
            outcome = f"{r.status} {body}"
        except OSError as e:
            outcome = f"error {type(e).__name__}"
        print(f"{start:.3f} {outcome}", flush=True)
        time.sleep(max(0.0, interval - (time.monotonic() - start)))


if __name__ == "__main__":
    main()

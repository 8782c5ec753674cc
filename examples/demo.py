"""`make run`: the bundled example end to end. Starts the example backends,
then `lbc up examples/pool.yaml --foreground`, and prints how to send
traffic; Ctrl-C drains lbc and stops everything.

    python examples/demo.py [--state DIR] [--once]

--once sends a few requests through the load balancer, prints the answers,
and stops (what the tests run)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", default=".lbc-demo")
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args()
    lbc = [sys.executable, "-m", "lbc"]
    backends = subprocess.Popen([sys.executable, str(HERE / "backends.py")], stdout=subprocess.PIPE, text=True)
    try:
        print(backends.stdout.readline().strip(), flush=True)
        subprocess.run([*lbc, "validate", str(HERE / "pool.yaml")], check=True)
        if args.once:
            subprocess.run([*lbc, "up", str(HERE / "pool.yaml"), "--state", args.state], check=True)
            try:
                for path in ("/", "/", "/api/users", "/api/users"):
                    with urllib.request.urlopen(f"http://127.0.0.1:8080{path}", timeout=10) as r:
                        print(f"GET {path} -> {r.status} {r.read().decode().strip()}")
                subprocess.run([*lbc, "status", "--state", args.state], check=True)
            finally:
                subprocess.run([*lbc, "down", "--state", args.state, "--drain-timeout", "2"], check=True)
            return 0
        lb = subprocess.Popen([*lbc, "up", str(HERE / "pool.yaml"), "--state", args.state, "--foreground"])
        time.sleep(2)
        print("\nSend traffic:  curl -i http://127.0.0.1:8080/        (pool web, round robin)\n"
              "               curl -i http://127.0.0.1:8080/api/    (pool api, weighted least connections)\n"
              f"See it:        .venv/bin/lbc status --state {args.state}\n"
              "Change it:     edit examples/pool.yaml, then .venv/bin/lbc plan / apply with the same --state\n"
              "Stop:          Ctrl-C (drains in-flight requests)\n", flush=True)
        try:
            return lb.wait()
        except KeyboardInterrupt:
            return lb.wait()
    finally:
        backends.terminate()
        backends.wait(10)


if __name__ == "__main__":
    sys.exit(main())

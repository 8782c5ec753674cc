"""CPU of the health checker probing 1,000 backends every second.

Starts one origin process listening on 1,000 ports of 127.0.0.1 (the test
origin: tests/support/origin.py, answering /health), an lbc node whose 10
pools of 100 backends have `http` checks at a 1 s interval, waits until every
backend is healthy, then reads the checker's CPU time (utime + stime, from
/proc through psutil) over a measuring window. The issue's bar: under 20% of
one core.

    .venv/bin/python bench/health_checker.py [--backends 1000] [--seconds 20] [--type http|tcp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = ROOT / "tests" / "support" / "origin.py"
BASE_PORT = 31000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--type", choices=("http", "tcp"), default="http")
    args = parser.parse_args()
    n = args.backends
    work = Path(tempfile.mkdtemp(prefix="lbc-health-bench-"))
    state = work / "state"
    lbc = [sys.executable, "-m", "lbc"]
    origin_cmd = [sys.executable, str(ORIGIN), "--id", "o"]
    for i in range(n):
        origin_cmd += ["--http", f"127.0.0.1:{BASE_PORT + i}"]
    origin = subprocess.Popen(origin_cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert origin.stdout.readline().strip() == "ready"
        pools = []
        per_pool = 100
        check = ("{type: http, path: /health, interval: 1s, timeout: 500ms}" if args.type == "http"
                 else "{type: tcp, interval: 1s, timeout: 500ms}")
        for p in range(0, n, per_pool):
            backends = "".join(f"      - {{id: b{i}, address: 127.0.0.1, port: {BASE_PORT + i}}}\n"
                               for i in range(p, min(n, p + per_pool)))
            pools.append(f"  - name: p{p // per_pool}\n    health_check: {check}\n    backends:\n{backends}")
        routes = "".join(f"      - {{match: {{path_prefix: /p{i}/}}, pool: p{i}}}\n" for i in range(len(pools) - 1))
        config = work / "pool.yaml"
        config.write_text(f"version: 1\nglobal: {{workers: 1}}\nlisteners:\n  - name: web\n"
                          f"    bind: 127.0.0.1:{BASE_PORT - 1}\n    routes:\n{routes}"
                          f"      - pool: p{len(pools) - 1}\npools:\n" + "".join(pools))
        subprocess.run([*lbc, "up", str(config), "--state", str(state)], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = json.loads(subprocess.run([*lbc, "status", "--json", "--state", str(state)],
                                               capture_output=True, text=True, check=True).stdout)
            healthy = sum(b["health"] == "healthy" for b in status["backends"])
            if healthy == n:
                break
            time.sleep(1)
        pid = int((state / "run" / "health.pid").read_text())
        checker = psutil.Process(pid)
        before, start = checker.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        after, elapsed = checker.cpu_times(), time.monotonic() - start
        used = (after.user + after.system) - (before.user + before.system)
        share = used / elapsed
        line = (f"health checker: {n} backends, {args.type} checks every 1 s, all {healthy} healthy; "
                f"{used:.2f} CPU-s over {elapsed:.1f} s = {share * 100:.1f}% of one core "
                f"({used / elapsed / n * 1e6:.0f} us per probe); bar: under 20%: {'met' if share < 0.2 else 'NOT met'}")
        print(line)
        (ROOT / "bench" / "RESULTS-health.md").write_text(
            "# Health checker CPU\n\n"
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {psutil.cpu_count()} CPUs\n"
            f"- Command: `.venv/bin/python bench/health_checker.py --backends {n} --seconds {args.seconds:g} "
            f"--type {args.type}`\n- Result: {line}\n")
        return 0 if share < 0.2 else 1
    finally:
        subprocess.run([*lbc, "down", "--state", str(state), "--drain-timeout", "1"], capture_output=True)
        origin.kill()
        origin.wait()


if __name__ == "__main__":
    sys.exit(main())

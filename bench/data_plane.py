#!/usr/bin/env python3
"""Data-plane speed: lbc against HAProxy and against no proxy, on NGINX.

    bench/run                 # or: make bench (runs this after config_speed.py)
    bench/run --rounds 5 --duration 8 --no-profile

The method is bench/METHOD (../shared/bench/METHOD.md in the workspace), in
short: NGINX backends, wrk -t1 -c50 --latency, the proxy pinned to CPU 1,
wrk and NGINX on CPU 0, and the figure is requests per proxy CPU-second
(requests completed / user+system seconds of the proxy's whole process tree,
read from /proc/PID/stat before and after each run). Proxies are compared in
one run, interleaved, and quoted as ratios of medians.

What one run does, in a temporary directory (removed afterwards unless --keep):

1. installs haproxy, nginx(-light) and wrk with apt-get when missing;
2. starts NGINX (Debian's, 1 worker, two server blocks on 127.0.0.1 answering
   `return 200 "ok\\n"`, access_log off, keepalive_requests 1000000) as a
   non-daemon child with its own pid and log paths, pinned to CPU 0;
3. starts HAProxy (nbthread 1, http-reuse always, balance roundrobin,
   keep-alive both sides; one http and one tcp frontend) pinned to CPU 1;
4. `taskset -c 1 lbc up` with 1 worker (an http and a tcp listener), and
   `lbc up` with 2 workers unpinned, each on its own state directory, with
   lbc's product defaults (forwarded headers and request ids on);
5. warms every setup up, then runs ROUNDS rounds; each round runs every
   setup once with the realistic headers (bench/realistic-headers.txt, one
   wrk -H per line) and once with wrk's bare request, then the fixed-rate
   runs (about 5,000 requests/s: wrk with a Lua delay() of 0-20 ms, mean
   10 ms, before each request on 50 connections, since Debian has no wrk2)
   for direct, HAProxy and lbc with 1 worker, giving CPU microseconds per
   request and p50/p99 there;
6. measures the RSS of the lbc worker before, while holding and after 10,000
   idle keep-alive client connections (bench/idle_clients.py, two helpers);
7. profiles the lbc worker with py-spy --nonblocking (pip-installed into
   the venv when missing) under the realistic-header load and ranks the hot
   spots in http.py and h1.py;
8. stops everything (`lbc down`, then by PID), prints the tables, and writes
   bench/RESULTS.md (and the raw figures to bench/out/).

Absolute figures drift on a shared machine; the ratios measured in the same
run are what to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADERS_FILE = HERE / "realistic-headers.txt"
OUT_DIR = HERE / "out"
RESULTS = HERE / "RESULTS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU, LOAD_CPU = "1", "0"
HOST = "127.0.0.1"

# The issue's targets.
TARGET_HTTP = 0.6  # lbc / HAProxy http, realistic headers, per proxy CPU-second
TARGET_TCP = 0.75  # lbc / HAProxy mode tcp
TARGET_P50_MS = 1.0  # lbc p50 at the fixed rate, above direct's
TARGET_P99_MS = 2.0

LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LBC_BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""
# Fixed rate without wrk2: each connection pauses a random 0..2*D ms (mean D)
# before each request, so 50 connections send about 50,000/D requests/s. The
# pauses are random so that the connections do not march in lockstep (a fixed
# pause keeps all 50 in one burst, and the latency then measures the burst).
LUA_PACED = "math.randomseed(1)\ndelay = function() return math.random(0, {twice}) end\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- tools -------------------------------------------------------------------------------


def apt_candidate(package: str) -> str | None:
    try:
        out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else None


def apt_install(packages: list[str]) -> None:
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise SystemExit(f"bench: need {' '.join(packages)}; run as root or install them: {' '.join(cmd)}")
        cmd = ["sudo", *cmd]
    log("installing " + " ".join(packages))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run((["sudo"] if os.geteuid() != 0 else []) + ["apt-get", "update"], env=env)
        subprocess.run(cmd, env=env, check=True)


def ensure_tools(install: bool) -> dict[str, str]:
    """The binaries, installing Debian's packages when one is missing.
    Returns notes for the report (versions, the fixed-rate method)."""
    wanted = {"haproxy": ["haproxy"], "nginx": ["nginx-light", "nginx"], "wrk": ["wrk"], "taskset": ["util-linux"]}
    for binary, candidates in wanted.items():
        if shutil.which(binary) or Path(f"/usr/sbin/{binary}").exists():
            continue
        if not install:
            raise SystemExit(f"bench: {binary} is missing (run without --no-install to apt-get it)")
        package = next((p for p in candidates if apt_candidate(p)), candidates[-1])
        apt_install([package])
    notes = {
        "haproxy": _first_line(["haproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
    }
    wrk2 = shutil.which("wrk2")
    if wrk2 is None and install and apt_candidate("wrk2"):
        apt_install(["wrk2"])
        wrk2 = shutil.which("wrk2")
    notes["fixed_rate"] = "wrk2 -R" if wrk2 else "wrk + Lua delay() (Debian has no wrk2)"
    notes["wrk2"] = wrk2 or ""
    return notes


def _first_line(cmd: list[str]) -> str:
    binary = shutil.which(cmd[0]) or f"/usr/sbin/{cmd[0]}"
    try:
        p = subprocess.run([binary, *cmd[1:]], capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"


def code_version() -> str:
    """The commit measured, and whether the work tree differs from it (read-only git)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                "lbc", "workers"], capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head or '?'}" + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# -- ports and processes ---------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n consecutive-ish free TCP ports on 127.0.0.1 below the ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(21000, 31000, 10)
        ports = list(range(base, base + n))
        if all(_port_free(p) for p in ports):
            return ports
    raise SystemExit("bench: no free ports found")


def _port_free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0] if isinstance(proc.args, list) else proc.args} exited {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g}s")


def http_get(port: int) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(utime, stime) of one process, in clock ticks, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line


def cpu_busy(cpu: int) -> int:
    """Ticks CPU `cpu` spent not idle since boot (/proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            return sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest time is inside user)
    return 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def kill_pids(pids: list[int], grace: float = 5.0, mark: str = "") -> None:
    """SIGTERM, then SIGKILL after `grace`, each by PID; only live ones whose
    command line contains `mark` (so a recycled PID is left alone)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and mark in " ".join(p.cmdline()):
                p.terminate()
                alive.append(p)
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=grace)


# -- the systems under test -------------------------------------------------------------


class Nginx:
    def __init__(self, work: Path, ports: list[int]) -> None:
        self.dir = work / "nginx"
        self.ports = ports
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []

    def server(self, i: int, port: int) -> str:
        """The server block of backend i (METHOD's: an "ok" and nothing else)."""
        return f'    server {{ listen {HOST}:{port} reuseport; return 200 "ok\\n"; }}\n'

    def start(self) -> None:
        d = self.dir
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        servers = "".join(self.server(i, p) for i, p in enumerate(self.ports))
        temps = "".join(f"    {kind}_temp_path {d}/tmp/{kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(
            "# Written by the benchmark (bench/); nothing here touches /etc/nginx.\n"
            "worker_processes 1;\n"
            "worker_rlimit_nofile 16384;\n"
            "daemon off;\n"
            f"pid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\n"
            "events { worker_connections 8192; }\n"
            "http {\n"
            "    access_log off;\n"
            "    keepalive_requests 1000000;\n"
            "    keepalive_timeout 75s;\n"
            "    default_type text/plain;\n"
            f"{temps}{servers}"
            "}\n")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        base = [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed: {check.stderr.strip()}")
        self.proc = subprocess.Popen(["taskset", "-c", LOAD_CPU, *base], stdout=subprocess.DEVNULL,
                                     stderr=open(d / "stderr.log", "wb"), start_new_session=True)
        for p in self.ports:
            wait_port(p, proc=self.proc)
        self.pids = tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = sorted(set(self.pids + tree(self.proc.pid)))
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGQUIT)  # graceful: master stops its worker
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        kill_pids(pids, mark="nginx")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None


class Haproxy:
    def __init__(self, work: Path, http_port: int, tcp_port: int, backends: list[int]) -> None:
        self.dir = work / "haproxy"
        self.http_port, self.tcp_port, self.backends = http_port, tcp_port, backends
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        servers = "".join(f"    server n{i + 1} {HOST}:{p}\n" for i, p in enumerate(self.backends))
        (self.dir / "haproxy.cfg").write_text(
            "# Written by bench/data_plane.py: METHOD's reference configuration.\n"
            "global\n"
            "    nbthread 1\n"
            "    maxconn 8000\n"
            "defaults\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout http-request 10s\n"
            "    timeout http-keep-alive 60s\n"
            "frontend http_in\n"
            "    mode http\n"
            "    option http-keep-alive\n"
            f"    bind {HOST}:{self.http_port}\n"
            "    default_backend nginx_http\n"
            "backend nginx_http\n"
            "    mode http\n"
            "    option http-keep-alive\n"
            "    http-reuse always\n"
            "    balance roundrobin\n"
            f"{servers}"
            "frontend tcp_in\n"
            "    mode tcp\n"
            f"    bind {HOST}:{self.tcp_port}\n"
            "    default_backend nginx_tcp\n"
            "backend nginx_tcp\n"
            "    mode tcp\n"
            "    balance roundrobin\n"
            f"{servers}")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        cfg = str(self.dir / "haproxy.cfg")
        check = subprocess.run([haproxy, "-c", "-q", "-f", cfg], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, haproxy, "-db", "-f", cfg],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"),
                                     start_new_session=True)
        wait_port(self.http_port, proc=self.proc)
        wait_port(self.tcp_port, proc=self.proc)

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            kill_pids(self.pids(), mark=str(self.dir))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None


class Lbc:
    """One lbc node (supervisord + workers) on its own state directory."""

    def __init__(self, work: Path, name: str, workers: int, http_port: int, tcp_port: int | None,
                 backends: list[int], pin: bool) -> None:
        self.name = name
        self.dir = work / name
        self.state = self.dir / "state"
        self.workers, self.http_port, self.tcp_port, self.backends, self.pin = workers, http_port, tcp_port, backends, pin
        self.known: set[int] = set()
        self.bin = str(Path(sys.executable).parent / "lbc")
        # Its own admin API port (the admin API and /metrics are on, as in production).
        self.admin_port = free_ports(1)[0]
        self.started = False

    def config(self) -> str:
        lines = ["# Written by bench/data_plane.py: lbc with its product defaults.", "version: 1",
                 self.global_line(), "listeners:",
                 "  - name: web", f'    bind: "{HOST}:{self.http_port}"', "    protocol: http",
                 "    routes:", "      - pool: nginx"]
        if self.tcp_port is not None:
            lines += ["  - name: raw", f'    bind: "{HOST}:{self.tcp_port}"', "    protocol: tcp", "    pool: nginx"]
        lines += ["pools:", "  - name: nginx", "    algorithm: round_robin", "    backends:"]
        lines += [f"      - {{id: n{i + 1}, address: {HOST}, port: {p}}}" for i, p in enumerate(self.backends)]
        return "\n".join(lines) + "\n"

    def global_line(self) -> str:
        return f'global: {{workers: {self.workers}, admin: {{bind: "{HOST}:{self.admin_port}"}}}}'

    def command(self) -> str:
        return (f"taskset -c {PROXY_CPU} " if self.pin else "") + f"lbc up --state {self.state} pool.yaml"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "pool.yaml"
        cfg.write_text(self.config())
        cmd = [self.bin, "up", "--state", str(self.state), str(cfg)]
        if self.pin:
            cmd = ["taskset", "-c", PROXY_CPU, *cmd]
        self.started = True
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        self.remember()
        if p.returncode != 0:
            raise RuntimeError(f"lbc up ({self.name}) failed: {p.stdout}{p.stderr}")
        wait_port(self.http_port)
        if self.tcp_port is not None:
            wait_port(self.tcp_port)

    def supervisord_pid(self) -> int | None:
        try:
            return int((self.state / "run" / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """supervisord and all its live children."""
        pid = self.supervisord_pid()
        found = tree(pid) if pid else []
        self.known.update(found)
        return found

    def remember(self) -> None:
        self.pids()
        for f in (self.state / "run").glob("worker-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                self.known.add(int(f.read_text().strip()))

    def worker_pids(self) -> list[int]:
        out = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                if "lbc_workers.proxy" in " ".join(psutil.Process(pid).cmdline()):
                    out.append(pid)
        return out

    def stop(self) -> None:
        if not self.started:
            return
        self.remember()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p = subprocess.run([self.bin, "down", "--state", str(self.state), "--drain-timeout", "5"],
                               capture_output=True, text=True, timeout=60)
            if p.returncode != 0 and "not running" not in p.stderr:
                log(f"lbc down ({self.name}): {p.stderr.strip()}")
        kill_pids(sorted(self.known), mark=str(self.state))  # whatever is left, by PID
        self.started = False


# -- wrk ----------------------------------------------------------------------------------


@dataclass
class Run:
    setup: str
    variant: str  # realistic, bare, fixed
    round: int
    requests: int
    seconds: float
    cpu_s: float | None  # proxy CPU seconds, user + system (None: no proxy)
    sys_s: float | None  # of which system
    p50_us: int
    p99_us: int
    errors: dict[str, int] = field(default_factory=dict)
    others_cpu1: float | None = None  # % of CPU 1 used by other processes than the proxy (pinned setups)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def per_cpu_s(self) -> float | None:
        return self.requests / self.cpu_s if self.cpu_s else None

    @property
    def cpu_us_per_req(self) -> float | None:
        return self.cpu_s * 1e6 / self.requests if self.cpu_s is not None and self.requests else None

    @property
    def sys_us_per_req(self) -> float | None:
        return self.sys_s * 1e6 / self.requests if self.sys_s is not None and self.requests else None


@dataclass
class Setup:
    name: str
    port: int
    pids: object  # () -> list[int], the proxy's process tree now; None for direct
    label: str
    pinned: bool = True  # the proxy runs on CPU 1 only (or there is none)


class Load:
    def __init__(self, work: Path, headers: list[str], connections: int, delay_ms: int, wrk2: str) -> None:
        self.headers = headers
        self.connections = connections
        self.delay_ms = delay_ms
        self.wrk2 = wrk2
        self.done_lua = work / "done.lua"
        self.done_lua.write_text(LUA_DONE)
        self.paced_lua = work / "paced.lua"
        self.paced_lua.write_text(LUA_PACED.format(twice=2 * delay_ms) + LUA_DONE)

    def argv(self, port: int, variant: str, seconds: int) -> list[str]:
        """wrk's command line (wrk and NGINX share CPU 0)."""
        fixed = variant == "fixed"
        hdrs = self.headers if variant in ("realistic", "fixed") else []
        if fixed and self.wrk2:
            rate = round(self.connections * 1000 / self.delay_ms)
            head = [self.wrk2, "-R", str(rate), "-s", str(self.done_lua)]
        else:
            head = ["wrk", "-s", str(self.paced_lua if fixed else self.done_lua)]
        cmd = ["taskset", "-c", LOAD_CPU, *head, "-t1", f"-c{self.connections}", f"-d{seconds}s", "--latency"]
        for h in hdrs:
            cmd += ["-H", h]
        return [*cmd, f"http://{HOST}:{port}/"]

    def run(self, setup: Setup, variant: str, seconds: int, rnd: int) -> Run:
        argv = self.argv(setup.port, variant, seconds)
        before, cpu1_before, t0 = self._cpu(setup), cpu_busy(int(PROXY_CPU)), time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        time.sleep(0.3)  # let the proxy finish closing the connections: part of the run's CPU
        after, cpu1_after, t1 = self._cpu(setup), cpu_busy(int(PROXY_CPU)), time.monotonic()
        line = next((x for x in p.stdout.splitlines() if x.startswith("LBC_BENCH ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
        s = json.loads(line[len("LBC_BENCH "):])
        cpu = sys_s = None
        if before is not None:
            user = sum(u - before.get(pid, (0, 0))[0] for pid, (u, _) in after.items())
            system = sum(k - before.get(pid, (0, 0))[1] for pid, (_, k) in after.items())
            cpu, sys_s = (user + system) / CLK_TCK, system / CLK_TCK
        errors = {k: s[k] for k in ("connect", "read", "write", "status", "timeout") if s[k]}
        others = None
        if setup.pinned:
            others = max(0.0, 100 * ((cpu1_after - cpu1_before) / CLK_TCK - (cpu or 0.0)) / (t1 - t0))
        return Run(setup.name, variant, rnd, s["requests"], s["duration_us"] / 1e6, cpu, sys_s, s["p50_us"],
                   s["p99_us"], errors, others)

    @staticmethod
    def _cpu(setup: Setup) -> dict[int, tuple[int, int]] | None:
        if setup.pids is None:
            return None
        out = {}
        for pid in setup.pids():
            t = cpu_ticks(pid)
            if t is not None:
                out[pid] = t
        return out


# -- idle connections and the profile ----------------------------------------------------


def idle_rss(lbc: Lbc, total: int, helpers: int = 2) -> dict[str, object]:
    """RSS of the (only) lbc worker before, while holding `total` idle keep-alive
    client connections (opened by `helpers` processes on CPU 0), and after."""
    (worker,) = lbc.worker_pids()
    result: dict[str, object] = {"pid": worker, "connections": total}
    result["rss_before_kib"] = rss_kib(worker)
    result["fds_before"] = fd_count(worker)
    per = [total // helpers + (1 if i < total % helpers else 0) for i in range(helpers)]
    procs = []
    t0 = time.monotonic()
    try:
        for n in per:
            procs.append(subprocess.Popen(
                ["taskset", "-c", LOAD_CPU, sys.executable, str(HERE / "idle_clients.py"), HOST, str(lbc.http_port),
                 str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        held = 0
        for p in procs:
            line = p.stdout.readline().split()
            held += int(line[1]) if len(line) == 2 and line[0] == "READY" else 0
        result["open_seconds"] = round(time.monotonic() - t0, 2)
        result["held"] = held
        time.sleep(2)  # let the worker settle (its sweep runs every second)
        result["rss_with_kib"] = rss_kib(worker)
        result["fds_with"] = fd_count(worker)
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    time.sleep(2)
    result["rss_after_kib"] = rss_kib(worker)
    result["fds_after"] = fd_count(worker)
    result["per_conn_bytes"] = round((result["rss_with_kib"] - result["rss_before_kib"]) * 1024 / max(held, 1))
    return result


def ensure_py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    if exe.exists():
        return str(exe)
    log("installing py-spy into the venv (pip)")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], capture_output=True, text=True)
    if p.returncode != 0 or not exe.exists():
        log(f"py-spy unavailable, no profile: {p.stderr.strip()[-300:]}")
        return None
    return str(exe)


def profile(lbc: Lbc, load: Load, seconds: int, out: Path, src: Path) -> dict[str, object] | None:
    """py-spy samples of the lbc worker under the realistic-header load.

    Sampling is --nonblocking: stopping the process for each sample (py-spy's
    default, and required by --native) lands samples on syscalls far more
    often than they take time (seen here: write() at 53% of samples stopped,
    against 31% not stopped and a 41% kernel share by perf). So the C and
    kernel time under a Python line counts as that line's, and the kernel's
    share of the worker's CPU comes from /proc over the same window."""
    spy = ensure_py_spy()
    if spy is None:
        return None
    (worker,) = lbc.worker_pids()
    raw = out / "profile.txt"
    wrk = subprocess.Popen(load.argv(lbc.http_port, "realistic", seconds + 3), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        before, t0 = cpu_ticks(worker), time.monotonic()
        p = subprocess.run(["taskset", "-c", LOAD_CPU, spy, "record", "-p", str(worker), "-d", str(seconds),
                            "-r", "250", "--nonblocking", "--format", "raw", "-o", str(raw)], capture_output=True,
                           text=True, timeout=seconds + 60)
        after, t1 = cpu_ticks(worker), time.monotonic()
    finally:
        try:
            wrk.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            wrk.kill()
            wrk.wait()
    if p.returncode != 0 or not raw.exists():
        log(f"py-spy failed: {p.stderr.strip()[-500:]}")
        return None
    result = summarize_profile(raw.read_text(), src)
    result["file"] = str(raw.relative_to(ROOT)) if raw.is_relative_to(ROOT) else str(raw)
    user, system = after[0] - before[0], after[1] - before[1]
    result["kernel_pct"] = round(100 * system / max(user + system, 1), 1)
    result["busy_pct"] = round(100 * (user + system) / CLK_TCK / (t1 - t0), 1)
    return result


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
OURS = ("http.py", "h1.py")


def _source(src: Path | None, file: str, line: int) -> str:
    path = (src or ROOT / "workers" / "proxy") / file
    if not path.is_file():
        return ""
    lines = path.read_text().splitlines()
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


def summarize_profile(text: str, src: Path | None = None, top: int = 15) -> dict[str, object]:
    """Collapsed stacks (`frame;frame;... count`, root first) -> shares of
    samples by innermost Python function (`own`: including the C and the
    syscalls it calls) and line, and inclusive."""
    total = 0
    own_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    own_line: Counter[tuple[str, str, int]] = Counter()
    for row in text.splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for fr in stack.split(";"):
            m = _FRAME.match(fr)
            if m and (m["file"].endswith(".py") or m["file"].startswith("<")):
                frames.append((m["func"], Path(m["file"]).name, int(m["line"] or 0)))
        if not frames:
            own_fn["(no Python frame)"] += n
            continue
        func, name, line = frames[-1]
        own_fn[f"{name}:{func}"] += n
        own_line[(name, func, line)] += n
        for k in {f"{f}:{fn}" for fn, f, _ in frames}:
            incl_fn[k] += n

    def pct(v: int) -> float:
        return round(100.0 * v / total, 1) if total else 0.0

    ours = [k for k in set(own_fn) | set(incl_fn) if k.split(":")[0] in OURS]
    ours.sort(key=lambda k: (-own_fn[k], -incl_fn[k]))
    lines = [k for k, _ in own_line.most_common() if k[0] in OURS][:top]
    return {
        "samples": total,
        "ours": [(k, pct(own_fn[k]), pct(incl_fn[k])) for k in ours[:top]],
        "own_all": [(k, pct(v)) for k, v in own_fn.most_common(top)],
        "lines_ours": [(f"{f}:{ln} {fn}", _source(src, f, ln), pct(own_line[(f, fn, ln)])) for f, fn, ln in lines],
    }


# -- report -------------------------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def summarize(runs: list[Run], setups: list[Setup]) -> dict[tuple[str, str], dict[str, object]]:
    by: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        by[(r.setup, r.variant)].append(r)
    out = {}
    for (setup, variant), rs in by.items():
        per = [r.per_cpu_s for r in rs]
        out[(setup, variant)] = {
            "n": len(rs),
            "per_cpu_s": median(per),
            "per_cpu_s_range": (min(per), max(per)) if all(x is not None for x in per) else None,
            "rps": median([r.rps for r in rs]),
            "p50_ms": median([r.p50_us / 1000 for r in rs]),
            "p99_ms": median([r.p99_us / 1000 for r in rs]),
            "cpu_pct": median([100 * r.cpu_s / r.seconds if r.cpu_s is not None else None for r in rs]),
            "cpu_us_per_req": median([r.cpu_us_per_req for r in rs]),
            "sys_us_per_req": median([r.sys_us_per_req for r in rs]),
            "others_cpu1": median([r.others_cpu1 for r in rs]),
            "errors": sum(sum(r.errors.values()) for r in rs),
        }
    return out


def ratio(s: dict, a: tuple[str, str], b: tuple[str, str], key: str = "per_cpu_s") -> float | None:
    x, y = s.get(a, {}).get(key), s.get(b, {}).get(key)
    return x / y if x and y else None


def _us(s: dict) -> str:
    if s["cpu_us_per_req"] is None:
        return "-"
    return f"{s['cpu_us_per_req']:.1f} ({s['sys_us_per_req']:.1f})"


def render(meta: dict, setups: list[Setup], summary: dict, rss: dict | None, prof: dict | None) -> str:
    L: list[str] = []
    add = L.append
    add("# Data-plane benchmark: lbc vs HAProxy vs direct\n")
    add(f"- Date: {meta['date']}")
    add(f"- Machine: {meta['machine']['nproc']} CPUs, {meta['machine']['cpu']}, Linux {meta['machine']['kernel']}, "
        f"Python {meta['machine']['python']}; load average at start {meta['load_start']}, at end {meta['load_end']}")
    add(f"- Command: `{meta['command']}` ({meta['elapsed_min']:.1f} min)")
    add(f"- Code: {meta['code']}")
    add(f"- Tools: {meta['tools']['haproxy']}; {meta['tools']['nginx']}; {meta['tools']['wrk']}")
    add(f"- Load: `{meta['wrk_example']}` (plus one `-H` per line of bench/realistic-headers.txt for "
        f"\"realistic\"; nothing for \"bare\"); {meta['rounds']} interleaved rounds, medians shown")
    add(f"- Placement: proxy on CPU {PROXY_CPU} (`taskset -c {PROXY_CPU}`; lbc through "
        f"`taskset -c {PROXY_CPU} lbc up`), wrk and NGINX on CPU {LOAD_CPU}; lbc with 2 workers is not pinned")
    add("- Figure: requests per proxy CPU-second = requests completed / (utime+stime of the proxy's whole "
        "process tree, from /proc/PID/stat before and after; for lbc supervisord and all its children)")
    add("- Method: bench/METHOD (the workspace's shared/bench/METHOD.md); script: bench/data_plane.py\n")

    add("## Verdict (the issue's targets)\n")
    for line in meta["verdict"]:
        add(f"- {line}")
    add("")
    add("## Saturation (wrk -t1 -c50)\n")
    add("*others on CPU 1*: the share of CPU 1 (the proxy's) that other processes of this shared machine used "
        "during the run (/proc/stat), a measure of the noise; not shown for the unpinned setup.\n")
    add("| setup | headers | req / proxy CPU-s | (min-max) | req/s | proxy CPU % | CPU us/req (kernel) | p50 ms "
        "| p99 ms | errors | others on CPU 1 % |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant in ("realistic", "bare"):
        for st in setups:
            s = summary.get((st.name, variant))
            if s is None:
                continue
            rng = s["per_cpu_s_range"]
            add(f"| {st.label} | {variant} | {fmt(s['per_cpu_s'])} | "
                f"{fmt(rng[0]) + '-' + fmt(rng[1]) if rng else '-'} | {fmt(s['rps'])} | {fmt(s['cpu_pct'], '.0f')} | "
                f"{_us(s)} | {fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} | {s['errors']} | "
                f"{fmt(s['others_cpu1'], '.0f')} |")

    add("\n## Ratios of the medians (requests per proxy CPU-second)\n")
    add("| comparison | lbc / HAProxy | target | met |")
    add("|---|---:|---:|---|")
    targets = meta["targets"]
    for row in targets:
        met = "-" if row["target"] is None or row["value"] is None else ("yes" if row["value"] >= row["target"] else "**no**")
        add(f"| {row['name']} | {fmt(row['value'], '.2f')} | {fmt(row['target'], '.2f')} | {met} |")

    add(f"\n## Fixed rate ({meta['fixed_method']}, -c{meta['connections']}, "
        f"about {meta['target_rate']:,} requests/s), realistic headers\n")
    add("| setup | achieved req/s | proxy CPU % | CPU us/req (kernel) | p50 ms | p99 ms | p50 - direct | p99 - direct "
        "| others on CPU 1 % |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    direct = summary.get(("direct", "fixed"))
    for st in setups:
        s = summary.get((st.name, "fixed"))
        if s is None:
            continue
        d50 = s["p50_ms"] - direct["p50_ms"] if direct and st.name != "direct" else None
        d99 = s["p99_ms"] - direct["p99_ms"] if direct and st.name != "direct" else None
        add(f"| {st.label} | {fmt(s['rps'])} | {fmt(s['cpu_pct'], '.1f')} | {_us(s)} | "
            f"{fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} | {fmt(d50, '+.2f')} | {fmt(d99, '+.2f')} | "
            f"{fmt(s['others_cpu1'], '.0f')} |")
    add("")
    for row in meta["latency_targets"]:
        add(f"- {row}")

    if rss:
        add("\n## Memory: one lbc worker holding idle client connections\n")
        add(f"- {rss['held']:,} of {rss['connections']:,} keep-alive client connections opened and held idle "
            f"(one request each, opened in {rss['open_seconds']} s by two helper processes on CPU {LOAD_CPU})")
        add(f"- worker RSS before: {rss['rss_before_kib'] / 1024:.1f} MiB ({rss['fds_before']} fds); holding them: "
            f"{rss['rss_with_kib'] / 1024:.1f} MiB ({rss['fds_with']} fds); after they closed: "
            f"{rss['rss_after_kib'] / 1024:.1f} MiB ({rss['fds_after']} fds)")
        add(f"- about {rss['per_conn_bytes']:,} bytes of RSS per idle client connection")

    if prof:
        add(f"\n## Profile: one lbc worker under the realistic-header load (py-spy --nonblocking, "
            f"{prof['samples']:,} samples)\n")
        add(f"Raw stacks: {prof['file']} (collapsed). The worker was {prof['busy_pct']:.0f}% busy during the profile, "
            f"{prof['kernel_pct']:.0f}% of its CPU time in the kernel (/proc/PID/stat). Shares are of the samples "
            "taken while it was busy. A function's *own* share counts the samples whose innermost Python frame is "
            "that function, including the C code and the syscalls it calls (a `transport.write` line is mostly "
            "the kernel sending on loopback and waking the receiver); `worker.py:main` is uvloop's loop in C: "
            "epoll, the read() syscalls and dispatching callbacks.\n")
        add("| function (http.py, h1.py) | own % | inclusive % |")
        add("|---|---:|---:|")
        for k, own, incl in prof["ours"]:
            add(f"| {k} | {own:.1f} | {incl:.1f} |")
        add("\nHottest lines of http.py and h1.py (own samples; source as the worker loaded it):\n")
        add("| line | source | own % |")
        add("|---|---|---:|")
        for where, src, own in prof["lines_ours"]:
            code = src.replace("|", "\\|")
            add(f"| {where} | `{code}` | {own:.1f} |")
        add("\nAll functions by own samples:\n")
        add("| function | own % |")
        add("|---|---:|")
        for k, own in prof["own_all"]:
            add(f"| {k} | {own:.1f} |")
    return "\n".join(L) + "\n"


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3 to write RESULTS.md)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per saturation run (wrk -d)")
    ap.add_argument("--rate-duration", type=int, default=10, help="seconds per fixed-rate run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--delay-ms", type=int, default=10,
                    help="fixed rate: mean pause before each request on each connection (random 0..2x)")
    ap.add_argument("--idle-connections", type=int, default=10_000)
    ap.add_argument("--profile-seconds", type=int, default=10)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get missing tools")
    ap.add_argument("--headers", type=Path, default=HEADERS_FILE)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    ap.add_argument("--max-minutes", type=float, default=30, help="stop everything and fail after this long")
    args = ap.parse_args(argv)
    if os.cpu_count() < 2:
        raise SystemExit("bench: needs 2 CPUs (proxy on CPU 1, load on CPU 0)")

    t_start = time.monotonic()
    meta: dict[str, object] = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                               "machine": machine(), "load_start": machine()["load"],
                               "rounds": args.rounds, "connections": args.connections,
                               "code": code_version(),
                               "command": os.environ.get("LBC_BENCH_COMMAND") or shlex.join(["bench/run", *sys.argv[1:]])}
    tools = ensure_tools(install=not args.no_install)
    meta["tools"] = tools
    meta["fixed_method"] = tools["fixed_rate"]
    meta["target_rate"] = round(args.connections * 1000 / args.delay_ms)
    headers = [h.strip() for h in args.headers.read_text().splitlines() if h.strip()]

    work = Path(tempfile.mkdtemp(prefix="lbc-bench-"))
    OUT_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = OUT_DIR / stamp
    out.mkdir()
    p = free_ports(8)
    backends = p[0:2]
    nginx = Nginx(work, backends)
    haproxy = Haproxy(work, p[2], p[3], backends)
    lbc1 = Lbc(work, "lbc1", 1, p[4], p[5], backends, pin=True)
    lbc2 = Lbc(work, "lbc2", 2, p[6], None, backends, pin=False)
    everything = [lbc2, lbc1, haproxy, nginx]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    def on_alarm(signum, frame):
        raise TimeoutError(f"the run took longer than --max-minutes {args.max_minutes:g}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.max_minutes * 60)))
    runs: list[Run] = []
    rss = prof = None
    try:
        log(f"work dir {work}; ports {p}")
        nginx.start()
        haproxy.start()
        lbc1.start()
        src = out / "src"  # the worker code as lbc1 loaded it (others may edit the tree meanwhile)
        src.mkdir()
        for f in (ROOT / "workers" / "proxy").glob("*.py"):
            shutil.copy2(f, src / f.name)
        lbc2.start()
        setups = [
            Setup("direct", backends[0], None, "direct (NGINX)"),
            Setup("haproxy-http", haproxy.http_port, haproxy.pids, "HAProxy http"),
            Setup("haproxy-tcp", haproxy.tcp_port, haproxy.pids, "HAProxy tcp"),
            Setup("lbc-http", lbc1.http_port, lbc1.pids, "lbc 1 worker http"),
            Setup("lbc-tcp", lbc1.tcp_port, lbc1.pids, "lbc 1 worker tcp"),
            Setup("lbc2-http", lbc2.http_port, lbc2.pids, "lbc 2 workers http (unpinned)", pinned=False),
        ]
        fixed_setups = ["direct", "haproxy-http", "haproxy-tcp", "lbc-http", "lbc-tcp"]
        for st in setups:
            reply = http_get(st.port)
            if not reply.startswith(b"HTTP/1.1 200") or not reply.endswith(b"ok\n"):
                raise RuntimeError(f"{st.name}: unexpected reply {reply[:200]!r}")
        load = Load(work, headers, args.connections, args.delay_ms, tools["wrk2"])
        example = load.argv(setups[0].port, "bare", args.duration)[3:]
        meta["wrk_example"] = shlex.join(Path(a).name if a.endswith(".lua") else a for a in example)

        log("warm-up")
        for st in setups:
            load.run(st, "realistic", 2, 0)

        per_round = len(setups) * 2 * args.duration + len(fixed_setups) * args.rate_duration
        log(f"{args.rounds} rounds of about {per_round / 60:.1f} min each")
        by_name = {s.name: s for s in setups}
        for rnd in range(1, args.rounds + 1):
            for variant in ("realistic", "bare"):
                for st in setups:
                    r = load.run(st, variant, args.duration, rnd)
                    runs.append(r)
                    log(f"round {rnd} {variant:9} {st.name:13} {r.rps:9,.0f} req/s  "
                        f"{fmt(r.per_cpu_s):>9} req/CPU-s  p50 {r.p50_us / 1000:.2f} ms  p99 {r.p99_us / 1000:.2f} ms"
                        + (f"  errors {r.errors}" if r.errors else ""))
            for name in fixed_setups:
                r = load.run(by_name[name], "fixed", args.rate_duration, rnd)
                runs.append(r)
                log(f"round {rnd} fixed     {name:13} {r.rps:9,.0f} req/s  "
                    f"{fmt(r.cpu_us_per_req, '.1f'):>7} CPU us/req  p50 {r.p50_us / 1000:.2f} ms  "
                    f"p99 {r.p99_us / 1000:.2f} ms" + (f"  errors {r.errors}" if r.errors else ""))

        log(f"holding {args.idle_connections:,} idle connections on lbc's worker")
        rss = idle_rss(lbc1, args.idle_connections)
        log(f"worker RSS {rss['rss_before_kib'] / 1024:.1f} MiB -> {rss['rss_with_kib'] / 1024:.1f} MiB "
            f"with {rss['held']:,} idle connections -> {rss['rss_after_kib'] / 1024:.1f} MiB after")
        if not args.no_profile:
            log(f"profiling lbc's worker for {args.profile_seconds} s (py-spy)")
            prof = profile(lbc1, load, args.profile_seconds, out, src)
    except (KeyboardInterrupt, TimeoutError) as e:
        log(f"{type(e).__name__} {e}; stopping everything")
        raise
    finally:
        signal.alarm(0)
        for thing in everything:
            try:
                thing.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {type(thing).__name__}: {e}")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(runs, setups)
    s = summary
    targets = [
        {"name": "http, realistic headers (lbc 1 worker / HAProxy http)",
         "value": ratio(s, ("lbc-http", "realistic"), ("haproxy-http", "realistic")), "target": TARGET_HTTP},
        {"name": "http, bare request (lbc 1 worker / HAProxy http)",
         "value": ratio(s, ("lbc-http", "bare"), ("haproxy-http", "bare")), "target": None},
        {"name": "tcp, bare request (lbc 1 worker tcp / HAProxy mode tcp)",
         "value": ratio(s, ("lbc-tcp", "bare"), ("haproxy-tcp", "bare")), "target": TARGET_TCP},
        {"name": "tcp, realistic headers (lbc 1 worker tcp / HAProxy mode tcp)",
         "value": ratio(s, ("lbc-tcp", "realistic"), ("haproxy-tcp", "realistic")), "target": TARGET_TCP},
        {"name": "http, realistic headers (lbc 2 workers unpinned / HAProxy http)",
         "value": ratio(s, ("lbc2-http", "realistic"), ("haproxy-http", "realistic")), "target": None},
        {"name": "fixed rate: CPU per request, HAProxy http / lbc http (higher is better for lbc)",
         "value": ratio(s, ("haproxy-http", "fixed"), ("lbc-http", "fixed"), "cpu_us_per_req"), "target": None},
        {"name": "fixed rate: CPU per request, HAProxy tcp / lbc tcp",
         "value": ratio(s, ("haproxy-tcp", "fixed"), ("lbc-tcp", "fixed"), "cpu_us_per_req"), "target": None},
    ]
    lat = []
    d, lb = s.get(("direct", "fixed")), s.get(("lbc-http", "fixed"))
    if d and lb:
        for q, limit in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)):
            diff = lb[f"{q}_ms"] - d[f"{q}_ms"]
            lat.append(f"Latency target, lbc http {q} at the fixed rate at most {limit:g} ms above direct's: "
                       f"{diff:+.2f} ms, {'met' if diff <= limit else '**not met**'}.")
    meta["targets"] = targets
    meta["latency_targets"] = lat
    verdict = []
    for row in targets:
        if row["target"] is not None:
            ok = row["value"] is not None and row["value"] >= row["target"]
            verdict.append(f"{row['name']}: {fmt(row['value'], '.2f')} against a target of at least "
                           f"{row['target']:.2f}: {'met' if ok else '**not met**'}.")
    meta["verdict"] = verdict + lat
    meta["load_end"] = machine()["load"]
    meta["elapsed_min"] = (time.monotonic() - t_start) / 60
    publish(args, out, render(meta, setups, summary, rss, prof),
            {"meta": meta, "runs": [r.__dict__ for r in runs], "rss": rss, "profile": prof})
    return 0


def publish(args: argparse.Namespace, out: Path, text: str, raw: dict) -> None:
    """The report and raw figures into `out`; the report to args.results too
    when the run has the rounds METHOD asks for (this script, tls.py, sticky.py)."""
    (out / "runs.json").write_text(json.dumps(raw, indent=1, default=str))
    (out / "RESULTS.md").write_text(text)
    print()
    print(text)
    if args.rounds >= 3:
        args.results.write_text(text)
        log(f"wrote {args.results} (raw figures in {out})")
    else:
        log(f"fewer than 3 rounds: {args.results} left alone; this run is in {out}")


if __name__ == "__main__":
    sys.exit(main())

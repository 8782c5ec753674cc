#!/usr/bin/env python3
"""Sticky sessions: what session persistence costs lbc, against none.

    .venv/bin/python bench/sticky.py                  # 3 rounds of 10 s runs, about 3 minutes
    .venv/bin/python bench/sticky.py --rounds 5 --duration 8 --keep

The method is bench/METHOD (../shared/bench/METHOD.md in the workspace), as
bench/data_plane.py applies it, whose helpers this script imports: NGINX
backends (1 worker, `return 200 "ok\\n"`), wrk -t1 -c50 --latency with the
ten realistic headers (bench/realistic-headers.txt), the proxy pinned to
CPU 1, wrk, NGINX and Redis on CPU 0, and the figure is requests per proxy
CPU-second (requests completed / user+system seconds of the proxy's whole
process tree, /proc/PID/stat before and after each run; for lbc supervisord
and all its children). Raw rates and p50/p99 are reported too. The setups
are interleaved in every round and compared as ratios of the medians to the
setup without stickiness.

Four lbc nodes, each `taskset -c 1 lbc up` with 1 worker on its own state
directory and port, lbc's product defaults, one http listener routing to a
pool of the same two NGINX backends; only the pool's `sticky` differs:

- none:         no `sticky`, `algorithm: round_robin` (the baseline);
- cookie:       `sticky: {mode: cookie}`. Before measuring, one GET without
                a cookie fetches a signed `SERVERID` cookie; wrk then sends
                it on every request (appended to the realistic headers'
                Cookie line), so every request is a valid cookie: an HMAC
                verified and the cookie cut out of the request, and no
                Set-Cookie in the response (checked before and after);
- header:       `sticky: {mode: header, header: X-User}`: a hash ring on
                the header's value, no shared state;
- header+redis: the same with `store: redis://127.0.0.1:PORT/0` on a
                redis-server of this run (`--save '' --appendonly no`,
                pinned to CPU 0, stopped by PID at the end): a GETEX
                (redis-py asyncio) per key and worker at most once a second
                (workers/proxy/store.py); the report counts GETEX calls per
                request.

Every setup gets the same requests: the realistic headers plus an `X-User`
header cycling over USERS users (a wrk Lua script builds one request per
user at start and hands them out in turn), and for the cookie setup the
SERVERID cookie as well. The setups that ignore X-User see the same bytes,
so the differences are the stickiness alone. The Redis store thus holds one
key per user. Redis's own CPU per request is measured too (its /proc
counters around each run); it is not in the proxy's figure.

The backends answer with an `X-Backend: n1`/`n2` header (the only change
from METHOD's NGINX) so that the checks before measuring can tell where a
request went: the baseline alternates, the cookie pins one backend, and each
user of the header setups keeps one backend.

Writes bench/RESULTS-sticky.md (with 3 rounds or more) and the raw figures to
bench/out/<stamp>-sticky/. Installs nginx-light, wrk and redis-server with
apt-get when missing (as bench/run does for its tools).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_plane as dp  # noqa: E402  (bench/data_plane.py: METHOD's helpers)

HERE = dp.HERE
RESULTS = HERE / "RESULTS-sticky.md"
HOST = dp.HOST
USERS = 1000
COOKIE = "SERVERID"
SETUPS = ("none", "cookie", "header", "header-redis")
STICKY = {
    "none": None,
    "cookie": "{mode: cookie}",
    "header": "{mode: header, header: X-User}",
    "header-redis": '{mode: header, header: X-User, store: "redis://%s:%d/0"}',
}
LABELS = {
    "none": "no stickiness (round_robin)",
    "cookie": "cookie (signed SERVERID)",
    "header": "header X-User, hash ring",
    "header-redis": "header X-User + Redis store",
}
# One request per user, built at start from wrk's headers (the -H lines) plus
# X-User, then handed out in turn: the per-request work in wrk is one Lua call.
LUA_USERS = r"""
local users, reqs, i = {users}, {{}}, 0
init = function(args)
  for u = 1, users do
    local h = {{}}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["X-User"] = string.format("user-%04d", u)
    reqs[u] = wrk.format(nil, nil, h)
  end
end
request = function()
  i = i % users + 1
  return reqs[i]
end
"""


def user(u: int) -> str:
    return f"user-{u:04d}"


# -- tools ----------------------------------------------------------------------------------


def ensure_tools(install: bool) -> dict[str, str]:
    """nginx, wrk, taskset and redis-server, apt-getting Debian's packages when missing."""
    wanted = {"nginx": ["nginx-light", "nginx"], "wrk": ["wrk"], "taskset": ["util-linux"],
              "redis-server": ["redis-server"]}
    for binary, candidates in wanted.items():
        if shutil.which(binary) or Path(f"/usr/sbin/{binary}").exists():
            continue
        if not install:
            raise SystemExit(f"bench: {binary} is missing (run without --no-install to apt-get it)")
        package = next((p for p in candidates if dp.apt_candidate(p)), candidates[-1])
        dp.apt_install([package])
    import redis

    return {"nginx": dp._first_line(["nginx", "-v"]), "wrk": dp._first_line(["wrk", "-v"]),
            "redis": dp._first_line(["redis-server", "--version"]), "redis-py": f"redis-py {redis.__version__}"}


# -- the systems under test -------------------------------------------------------------------


class TaggedNginx(dp.Nginx):
    """METHOD's NGINX, each server block adding `X-Backend: nI` to its answer."""

    def server(self, i: int, port: int) -> str:
        return f'    server {{ listen {HOST}:{port} reuseport; add_header X-Backend n{i + 1}; return 200 "ok\\n"; }}\n'


class Redis:
    """A redis-server of this run only: no persistence, pinned to the load CPU."""

    def __init__(self, work: Path, port: int) -> None:
        self.dir = work / "redis"
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.client = None

    def start(self) -> None:
        import redis

        self.dir.mkdir(parents=True, exist_ok=True)
        argv = ["taskset", "-c", dp.LOAD_CPU, shutil.which("redis-server") or "/usr/bin/redis-server",
                "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"),
                                     start_new_session=True)
        dp.wait_port(self.port, proc=self.proc)
        self.client = redis.Redis(host=HOST, port=self.port, socket_timeout=5)
        self.client.ping()

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs redis-server: the same process

    def cpu(self) -> tuple[int, int]:
        return dp.cpu_ticks(self.pid) or (0, 0)

    def getex_calls(self) -> int:
        return int(self.client.info("commandstats").get("cmdstat_getex", {}).get("calls", 0))

    def keys(self, pattern: str) -> int:
        return sum(1 for _ in self.client.scan_iter(match=pattern, count=1000))

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.client.close()
        dp.kill_pids([self.proc.pid], mark="redis-server")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None


class LbcSticky(dp.Lbc):
    """lbc with one http listener and a pool with the given `sticky` (or none)."""

    def __init__(self, work: Path, name: str, port: int, backends: list[int], sticky: str | None) -> None:
        super().__init__(work, name, 1, port, None, backends, pin=True)
        self.sticky = sticky

    def config(self) -> str:
        lines = ["# Written by bench/sticky.py: lbc with its product defaults.", "version: 1",
                 self.global_line(), "listeners:",
                 "  - name: web", f'    bind: "{HOST}:{self.http_port}"', "    protocol: http",
                 "    routes:", "      - pool: nginx",
                 "pools:", "  - name: nginx", "    algorithm: round_robin"]
        if self.sticky:
            lines.append(f"    sticky: {self.sticky}")
        lines.append("    backends:")
        lines += [f"      - {{id: n{i + 1}, address: {HOST}, port: {p}}}" for i, p in enumerate(self.backends)]
        return "\n".join(lines) + "\n"


class StickyLoad(dp.Load):
    """wrk -t1 -c50 --latency with the realistic headers and X-User cycling
    over USERS users; each setup's port may add its own headers."""

    def __init__(self, work: Path, headers: list[str], connections: int) -> None:
        super().__init__(work, headers, connections, 10, "")
        self.users_lua = work / "users.lua"
        self.users_lua.write_text(LUA_USERS.format(users=USERS) + dp.LUA_DONE)
        self.by_port: dict[int, list[str]] = {}

    def argv(self, port: int, variant: str, seconds: int) -> list[str]:
        cmd = ["taskset", "-c", dp.LOAD_CPU, "wrk", "-s", str(self.users_lua), "-t1", f"-c{self.connections}",
               f"-d{seconds}s", "--latency"]
        for h in self.by_port.get(port, self.headers):
            cmd += ["-H", h]
        return [*cmd, f"http://{HOST}:{port}/"]


def with_cookie(headers: list[str], value: str) -> list[str]:
    """The headers with `SERVERID=value` appended to the Cookie line (or a Cookie line added)."""
    out, done = [], False
    for h in headers:
        if not done and h.split(":", 1)[0].strip().lower() == "cookie":
            h = f"{h.rstrip().rstrip(';')}; {COOKIE}={value}"
            done = True
        out.append(h)
    return out if done else [*out, f"Cookie: {COOKIE}={value}"]


# -- checks before and after measuring ----------------------------------------------------------


def fetch(port: int, headers: list[str]) -> tuple[int, list[tuple[str, str]], bytes]:
    """GET / with these headers on a new connection: (status, headers lowercased, body)."""
    lines = ["GET / HTTP/1.1", "Host: bench", *headers, "Connection: close", "", ""]
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall("\r\n".join(lines).encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *rest = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    hdrs = [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in rest)]
    return status, hdrs, body


def header(hdrs: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in hdrs if k == name]


def get_cookie(port: int, headers: list[str]) -> tuple[str, str]:
    """A SERVERID cookie from lbc (a request without one): (value, the Set-Cookie line)."""
    status, hdrs, _ = fetch(port, [*headers, f"X-User: {user(1)}"])
    sets = [v for v in header(hdrs, "set-cookie") if v.startswith(COOKIE + "=")]
    if status != 200 or len(sets) != 1:
        raise RuntimeError(f"cookie: no single {COOKIE} Set-Cookie in the answer ({status}, {hdrs})")
    return sets[0].split(";", 1)[0].split("=", 1)[1], sets[0]


def check_cookie(port: int, headers: list[str], n: int = 10) -> dict[str, object]:
    """n requests with the cookie: all 200, no Set-Cookie, one backend."""
    statuses, set_cookies, backends = [], 0, set()
    for i in range(n):
        status, hdrs, body = fetch(port, [*headers, f"X-User: {user(1 + i)}"])
        statuses.append(status)
        set_cookies += len(header(hdrs, "set-cookie"))
        backends.update(header(hdrs, "x-backend"))
    return {"requests": n, "ok": statuses.count(200), "set_cookie": set_cookies, "backends": sorted(backends)}


def check_affinity(port: int, headers: list[str], users: int = 20, repeat: int = 3) -> dict[str, object]:
    """`repeat` requests for each of `users` users: how many users saw more than
    one backend, and which backends were used at all."""
    moved, used, ok, total = 0, set(), 0, 0
    for u in range(1, users + 1):
        seen = set()
        for _ in range(repeat):
            status, hdrs, _ = fetch(port, [*headers, f"X-User: {user(u)}"])
            ok += status == 200
            total += 1
            seen.update(header(hdrs, "x-backend"))
        moved += len(seen) > 1
        used |= seen
    return {"users": users, "requests": total, "ok": ok, "users_on_several_backends": moved,
            "backends": sorted(used)}


def store_log(nodes) -> list[str]:
    """The lines of lbc's logs about the sticky store (warnings: Redis failed, answers again)."""
    found = []
    for node in nodes:
        for f in sorted(node.state.rglob("*.log")):
            with contextlib.suppress(OSError):
                found += [line.strip() for line in f.read_text(errors="replace").splitlines() if "sticky store" in line]
    return found


# -- report ---------------------------------------------------------------------------------


def summarize(runs: list[dp.Run], extra: list[dict[str, float]], setups: list[dp.Setup]) -> dict[str, dict]:
    base = dp.summarize(runs, setups)
    out = {}
    for st in setups:
        s = base.get((st.name, "realistic"))
        if s is None:
            continue
        mine = [(r, e) for r, e in zip(runs, extra, strict=True) if r.setup == st.name]
        s = dict(s)
        s["redis_us"] = dp.median([e["redis_cpu_s"] * 1e6 / r.requests for r, e in mine if r.requests])
        s["getex_per_req"] = dp.median([e["getex"] / r.requests for r, e in mine if r.requests])
        s["redis_cpu_pct"] = dp.median([100 * e["redis_cpu_s"] / r.seconds for r, e in mine])
        out[st.name] = s
    return out


def ratio(s: dict, name: str, key: str) -> float | None:
    a, b = s.get(name, {}).get(key), s.get("none", {}).get(key)
    return a / b if a and b else None


def render(meta: dict, summary: dict) -> str:
    L: list[str] = []
    add = L.append
    m = meta["machine"]
    t = meta["tools"]
    add("# Sticky sessions benchmark: what session persistence costs lbc\n")
    add(f"- Date: {meta['date']}")
    add(f"- Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
        f"load average at start {meta['load_start']}, at end {meta['load_end']}")
    add(f"- Command: `{meta['command']}` ({meta['elapsed_min']:.1f} min)")
    add(f"- Code: {meta['code']}")
    add(f"- Tools: {t['nginx']}; {t['wrk']}; {t['redis']}; {t['redis-py']} (lbc's store client)")
    add("- Setups: four lbc nodes (`taskset -c 1 lbc up`, 1 worker, each on its own state directory and port, "
        "product defaults), one http listener each, a pool of the same two NGINX backends with "
        "`algorithm: round_robin`; the pool's `sticky`:")
    for name in SETUPS:
        add(f"  - {LABELS[name]}: `{meta['sticky'][name] or 'none'}`")
    add(f"- Load: `{meta['wrk_example']}` plus one `-H` per line of bench/realistic-headers.txt, for every setup; "
        f"users.lua adds `X-User: user-0001` .. `user-{USERS:04d}`, one user per request in turn (each request "
        "prebuilt at start); the cookie setup's Cookie line also carries the SERVERID cookie "
        f"(`...; theme=dark; {COOKIE}=<value>`). {meta['rounds']} interleaved rounds of {meta['duration']} s, "
        "medians shown")
    add(f"- Placement: lbc on CPU {dp.PROXY_CPU}; wrk, NGINX (1 worker, `return 200 \"ok\\n\"` plus "
        f"`add_header X-Backend nI` to check where requests go) and redis-server (`--save '' --appendonly no`) "
        f"on CPU {dp.LOAD_CPU}")
    add("- Figure: requests per proxy CPU-second = requests completed / (utime+stime of lbc's whole process tree, "
        "supervisord and all its children, from /proc/PID/stat before and after). Redis's CPU is not in it; it is "
        "shown on its own (redis-server's /proc/PID/stat, all its threads, around each run).")
    add("- Method: bench/METHOD (the workspace's shared/bench/METHOD.md); script: bench/sticky.py\n")

    add("## Ratios of the medians (setup / no stickiness)\n")
    add("| setup | per proxy CPU-second | raw req/s | CPU us/req added | p50 added ms | p99 added ms |")
    add("|---|---:|---:|---:|---:|---:|")
    base = summary.get("none", {})
    for name in SETUPS[1:]:
        s = summary.get(name)
        if s is None:
            continue

        def diff(key: str, spec: str, s=s) -> str:
            return dp.fmt(s[key] - base[key] if s.get(key) is not None and base.get(key) is not None else None, spec)

        add(f"| {LABELS[name]} | {dp.fmt(ratio(summary, name, 'per_cpu_s'), '.2f')} | "
            f"{dp.fmt(ratio(summary, name, 'rps'), '.2f')} | {diff('cpu_us_per_req', '+.1f')} | "
            f"{diff('p50_ms', '+.2f')} | {diff('p99_ms', '+.2f')} |")

    add("\n## Figures (medians)\n")
    add("*others on CPU 1*: the share of CPU 1 (lbc's) that other processes of this shared machine used during "
        "the run (/proc/stat), a measure of the noise; the three idle lbc nodes of the other setups are among "
        "them. *errors*: wrk's connect/read/write/timeout errors and non-2xx/3xx answers, summed over the rounds.\n")
    add("| setup | req / proxy CPU-s | (min-max) | req/s | proxy CPU % | CPU us/req (kernel) | p50 ms | p99 ms "
        "| errors | others on CPU 1 % | Redis CPU us/req | Redis CPU % | GETEX / req |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in SETUPS:
        s = summary.get(name)
        if s is None:
            continue
        rng = s["per_cpu_s_range"]
        us = "-" if s["cpu_us_per_req"] is None else f"{s['cpu_us_per_req']:.1f} ({s['sys_us_per_req']:.1f})"
        add(f"| {LABELS[name]} | {dp.fmt(s['per_cpu_s'])} | {dp.fmt(rng[0]) + '-' + dp.fmt(rng[1]) if rng else '-'} | "
            f"{dp.fmt(s['rps'])} | {dp.fmt(s['cpu_pct'], '.0f')} | {us} | {dp.fmt(s['p50_ms'], '.2f')} | "
            f"{dp.fmt(s['p99_ms'], '.2f')} | {s['errors']} | {dp.fmt(s['others_cpu1'], '.0f')} | "
            f"{dp.fmt(s['redis_us'], '.1f')} | {dp.fmt(s['redis_cpu_pct'], '.0f')} | "
            f"{dp.fmt(s['getex_per_req'], '.2f')} |")

    add("\n## Checks\n")
    for line in meta["checks"]:
        add(f"- {line}")
    add("")
    for note in meta["notes"]:
        add(f"- {note}")
    return "\n".join(L) + "\n"


def describe_checks(c: dict) -> list[str]:
    def aff(name: str) -> str:
        a = c[name]
        return (f"{a['users']} users x {a['requests'] // a['users']} requests: {a['ok']}/{a['requests']} answered 200, "
                f"{a['users_on_several_backends']} users reached more than one backend, backends used: "
                f"{', '.join(a['backends'])}")

    out = [f"No stickiness: {c['none']['requests']} requests answered 200: {c['none']['ok']}, backends used: "
           f"{', '.join(c['none']['backends'])}.",
           f"Cookie: a request without one got `Set-Cookie: {c['cookie_set']}`."]
    for when in ("before", "after"):
        k = c[f"cookie_{when}"]
        out.append(f"Cookie, {when} measuring: {k['requests']} requests with it (and the realistic Cookie line): "
                   f"{k['ok']} answered 200, {k['set_cookie']} Set-Cookie header(s) in the answers "
                   f"({'the cookie was accepted' if k['set_cookie'] == 0 else '**the cookie was not accepted**'}), "
                   f"backends: {', '.join(k['backends'])}.")
    out.append(f"Header, hash ring: {aff('header')}.")
    out.append(f"Header + Redis store: {aff('header-redis')}.")
    out.append(f"Redis after the run: {c['redis_keys']:,} `lbc:sticky:*` keys (one per user: {USERS:,}), "
               f"GETEX calls in all {c['redis_getex']:,}.")
    sl = c["store_log"]
    out.append(f"`sticky store` lines in lbc's logs (Redis failed, or answers again): {sl['warm_up']} before the "
               f"measured rounds (start and warm-up, when the {USERS:,} keys were first written), {sl['rounds']} "
               "during them" + (": " + "; ".join(f"`{x}`" for x in sl["examples"]) if sl["examples"] else "") + ".")
    return out


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3 to write RESULTS-sticky.md)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per run (wrk -d)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get missing tools")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    ap.add_argument("--max-minutes", type=float, default=20, help="stop everything and fail after this long")
    args = ap.parse_args(argv)
    if os.cpu_count() < 2:
        raise SystemExit("bench: needs 2 CPUs (proxy on CPU 1, load on CPU 0)")

    t_start = time.monotonic()
    meta: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": dp.machine(),
        "load_start": dp.machine()["load"], "rounds": args.rounds, "duration": args.duration,
        "code": dp.code_version(),
        "command": os.environ.get("LBC_BENCH_COMMAND")
        or shlex.join([".venv/bin/python", "bench/sticky.py", *sys.argv[1:]]),
    }
    meta["tools"] = ensure_tools(install=not args.no_install)
    headers = [h.strip() for h in dp.HEADERS_FILE.read_text().splitlines() if h.strip()]

    work = Path(tempfile.mkdtemp(prefix="lbc-bench-sticky-"))
    dp.OUT_DIR.mkdir(exist_ok=True)
    out = dp.OUT_DIR / (time.strftime("%Y%m%d-%H%M%S") + "-sticky")
    out.mkdir()
    p = dp.free_ports(7)
    backends = p[0:2]
    nginx = TaggedNginx(work, backends)
    redis = Redis(work, p[2])
    sticky = {name: (STICKY[name] % (HOST, redis.port) if name == "header-redis" else STICKY[name])
              for name in SETUPS}
    meta["sticky"] = sticky
    nodes = {name: LbcSticky(work, f"lbc-{name}", p[3 + i], backends, sticky[name]) for i, name in enumerate(SETUPS)}
    everything = [*nodes.values(), redis, nginx]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    def on_alarm(signum, frame):
        raise TimeoutError(f"the run took longer than --max-minutes {args.max_minutes:g}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.max_minutes * 60)))
    runs: list[dp.Run] = []
    extra: list[dict[str, float]] = []
    checks: dict[str, object] = {}
    try:
        dp.log(f"work dir {work}; ports {p}")
        nginx.start()
        redis.start()
        for node in nodes.values():
            node.start()
        setups = [dp.Setup(name, nodes[name].http_port, nodes[name].pids, LABELS[name]) for name in SETUPS]
        load = StickyLoad(work, headers, args.connections)

        # Checks: where requests go, and that the cookie is accepted.
        none = check_cookie(nodes["none"].http_port, headers)
        checks["none"] = none
        value, checks["cookie_set"] = get_cookie(nodes["cookie"].http_port, headers)
        cookie_headers = with_cookie(headers, value)
        load.by_port[nodes["cookie"].http_port] = cookie_headers
        checks["cookie_before"] = check_cookie(nodes["cookie"].http_port, cookie_headers)
        for name in ("header", "header-redis"):
            checks[name] = check_affinity(nodes[name].http_port, headers)
        for name, c in checks.items():
            dp.log(f"check {name}: {c}")
        problems = []
        if none["ok"] != none["requests"] or len(none["backends"]) != 2:
            problems.append(f"no stickiness: {none}")
        k = checks["cookie_before"]
        if k["ok"] != k["requests"] or k["set_cookie"] or len(k["backends"]) != 1:
            problems.append(f"cookie: {k}")
        for name in ("header", "header-redis"):
            a = checks[name]
            if a["ok"] != a["requests"] or a["users_on_several_backends"] or len(a["backends"]) != 2:
                problems.append(f"{name}: {a}")
        if problems:
            raise RuntimeError("checks failed: " + "; ".join(problems))

        example = load.argv(setups[0].port, "realistic", args.duration)[3:]
        meta["wrk_example"] = shlex.join(Path(a).name if a.endswith(".lua") else a for a in example)

        dp.log("warm-up")
        for st in setups:
            load.run(st, "realistic", 2, 0)

        warm = store_log(nodes.values())
        dp.log(f"{args.rounds} rounds of about {len(setups) * (args.duration + 1) / 60:.1f} min each")
        for rnd in range(1, args.rounds + 1):
            for st in setups:
                r0, g0 = redis.cpu(), redis.getex_calls()
                r = load.run(st, "realistic", args.duration, rnd)
                r1, g1 = redis.cpu(), redis.getex_calls()
                e = {"redis_cpu_s": (sum(r1) - sum(r0)) / dp.CLK_TCK, "getex": g1 - g0}
                runs.append(r)
                extra.append(e)
                dp.log(f"round {rnd} {st.name:12} {r.rps:9,.0f} req/s  {dp.fmt(r.per_cpu_s):>9} req/CPU-s  "
                       f"CPU {100 * r.cpu_s / r.seconds:3.0f}%  p50 {r.p50_us / 1000:.2f} ms  "
                       f"p99 {r.p99_us / 1000:.2f} ms  others {r.others_cpu1:.0f}%  "
                       f"redis {e['redis_cpu_s'] * 1e6 / max(r.requests, 1):.1f} us/req, "
                       f"GETEX/req {e['getex'] / max(r.requests, 1):.2f}"
                       + (f"  errors {r.errors}" if r.errors else ""))

        checks["cookie_after"] = check_cookie(nodes["cookie"].http_port, cookie_headers)
        dp.log(f"check cookie after: {checks['cookie_after']}")
        checks["redis_keys"] = redis.keys("lbc:sticky:*")
        checks["redis_getex"] = redis.getex_calls()
        found = store_log(nodes.values())
        checks["store_log"] = {"warm_up": len(warm), "rounds": len(found) - len(warm),
                               "examples": sorted({line.split(" ", 3)[-1] for line in found})[:3]}
        if found:
            dp.log(f"sticky store lines in lbc's logs: {checks['store_log']}")
    except (KeyboardInterrupt, TimeoutError) as e:
        dp.log(f"{type(e).__name__} {e}; stopping everything")
        raise
    finally:
        signal.alarm(0)
        if args.keep:
            for node in nodes.values():  # the configs, for the record
                with contextlib.suppress(OSError):
                    shutil.copy2(node.dir / "pool.yaml", out / f"{node.name}.yaml")
        for thing in everything:
            try:
                thing.stop()
            except Exception as e:  # keep stopping the others
                dp.log(f"stopping {type(thing).__name__}: {e}")
        if args.keep:
            dp.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(runs, extra, setups)
    meta["checks"] = describe_checks(checks)
    meta["notes"] = [
        "The cookie setup measures the steady state of a client that already has its cookie: every request "
        "carries a valid one, so each costs an HMAC-SHA256 verification and the cookie cut out of the request, "
        "and none gets a Set-Cookie. One cookie for all 50 connections: all its requests go to one backend.",
        "The header setups place each of the users by the value of X-User; without a store on the hash ring "
        "(blake2b-64) in the worker, with the store by one Redis GETEX per request (the first request of each "
        "user also a SET, done in the warm-up), the request waiting for Redis's answer.",
        "Redis's CPU (the last columns) is on CPU 0 and not in the proxy's figure; a deployment pays it "
        "on the Redis host.",
    ]
    meta["load_end"] = dp.machine()["load"]
    meta["elapsed_min"] = (time.monotonic() - t_start) / 60
    dp.publish(args, out, render(meta, summary),
               {"meta": meta, "checks": checks, "runs": [{**r.__dict__, **e} for r, e in zip(runs, extra, strict=True)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

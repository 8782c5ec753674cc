#!/usr/bin/env python3
"""TLS speed: lbc against HAProxy, terminating TLS with the same certificate.

    .venv/bin/python bench/tls.py                  # 3 rounds of 10 s runs, about 6 minutes
    .venv/bin/python bench/tls.py --rounds 5 --duration 8 --keep

The method is bench/METHOD (../shared/bench/METHOD.md in the workspace), as
bench/data_plane.py applies it, whose helpers this script imports: NGINX
backends (plain HTTP, 1 worker, `return 200 "ok\\n"`), the proxy pinned to
CPU 1, every load generator and NGINX on CPU 0, and the figure is requests
per proxy CPU-second (requests completed / user+system seconds of the
proxy's whole process tree, /proc/PID/stat before and after each run; for
lbc supervisord and all its children). Raw rates are reported too. Proxies
are interleaved in every round and compared as ratios of the medians.

Both proxies serve one certificate made by trustme for this run (ECDSA
P-256, its CA's signature, a chain of one) and Mozilla's "intermediate"
settings: lbc by its defaults, HAProxy (2.6, `nbthread 1`, `mode http`,
`http-reuse always`) with Mozilla's generator's global lines for it
(ssl-default-bind-ciphers, -ciphersuites, -curves X25519:P-256:P-384,
-options prefer-client-ciphers ssl-min-ver TLSv1.2 no-tls-tickets) and
`alpn http/1.1`. Before measuring, the script checks each proxy with a
verifying client (the certificate, a 200 "ok"), records what a default
OpenSSL client negotiates (version, suite, key exchange group), and whether
a TLS 1.3 session resumes.

The loads, each run on every setup in turn, each round:

- keepalive:  wrk -t1 -c50 --latency over https, the ten realistic headers
              (bench/realistic-headers.txt): HTTPS requests on kept-alive
              connections, the handshakes done once;
- bare:       the same with wrk's bare request;
- close:      wrk -t1 -c50 with `Connection: close`: a new TCP connection
              and TLS handshake for every request. wrk keeps the session
              of a connection for the next one on the same slot (SSL_clear
              after a clean shutdown), so these handshakes are *resumed*
              ones where the server allows it (HAProxy's session cache
              counters show the share; the report quotes it);
- full:       C parallel `openssl s_time -new -www /` (HTTP/1.0, one request
              per connection): a *full* handshake (ECDHE + ECDSA signature)
              for every request; handshakes per second = connections per
              second.

Writes bench/RESULTS-tls.md (with 3 rounds or more) and the raw figures to
bench/out/<stamp>-tls/. Installs haproxy, nginx-light and wrk with apt-get
when missing (as bench/run); openssl and trustme must be there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_plane as dp  # noqa: E402  (bench/data_plane.py: METHOD's helpers)

HERE = dp.HERE
RESULTS = HERE / "RESULTS-tls.md"
HOST = dp.HOST
NAME = "bench.example.test"
# Mozilla's "intermediate" for HAProxy (ssl-config.mozilla.org, HAProxy 2.6,
# OpenSSL 3.0); the DHE suites are left out, as they are of lbc's default,
# and do not apply to an ECDSA certificate anyway.
MOZILLA_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                   "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
MOZILLA_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
VARIANTS = ("keepalive", "bare", "close", "full")
LABELS = {
    "keepalive": "HTTPS requests, keep-alive, realistic headers (wrk)",
    "bare": "HTTPS requests, keep-alive, bare request (wrk)",
    "close": "a TLS handshake per request, resumed (wrk, Connection: close)",
    "full": "a full TLS handshake per request (openssl s_time -new)",
}


def make_certificate(d: Path) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    leaf = ca.issue_cert(NAME, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=89))
    out = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem", "combined": d / "combined.pem"}
    ca.cert_pem.write_to_path(out["ca"])
    leaf.private_key_pem.write_to_path(out["key"])
    out["cert"].write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    out["combined"].write_bytes(out["cert"].read_bytes() + out["key"].read_bytes())  # HAProxy's crt: chain + key
    return out


class HaproxyTls(dp.Haproxy):
    """HAProxy terminating TLS (METHOD's http reference plus Mozilla's intermediate)."""

    def __init__(self, work: Path, port: int, backends: list[int], pem: Path) -> None:
        super().__init__(work, port, None, backends)
        self.pem = pem
        self.sock = self.dir / "admin.sock"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        servers = "".join(f"    server n{i + 1} {HOST}:{p}\n" for i, p in enumerate(self.backends))
        (self.dir / "haproxy.cfg").write_text(
            "# Written by bench/tls.py: METHOD's reference http configuration, terminating TLS with\n"
            "# Mozilla's intermediate settings (ssl-config.mozilla.org, HAProxy 2.6).\n"
            "global\n"
            "    nbthread 1\n"
            "    maxconn 8000\n"
            f"    stats socket {self.sock} mode 600 level admin\n"
            "    ssl-default-bind-curves X25519:P-256:P-384\n"
            f"    ssl-default-bind-ciphers {MOZILLA_CIPHERS}\n"
            f"    ssl-default-bind-ciphersuites {MOZILLA_SUITES}\n"
            "    ssl-default-bind-options prefer-client-ciphers ssl-min-ver TLSv1.2 no-tls-tickets\n"
            "defaults\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout http-request 10s\n"
            "    timeout http-keep-alive 60s\n"
            "frontend https_in\n"
            "    mode http\n"
            "    option http-keep-alive\n"
            f"    bind {HOST}:{self.http_port} ssl crt {self.pem} alpn http/1.1\n"
            "    default_backend nginx_http\n"
            "backend nginx_http\n"
            "    mode http\n"
            "    option http-keep-alive\n"
            "    http-reuse always\n"
            "    balance roundrobin\n"
            f"{servers}")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        cfg = str(self.dir / "haproxy.cfg")
        check = subprocess.run([haproxy, "-c", "-q", "-f", cfg], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen(["taskset", "-c", dp.PROXY_CPU, haproxy, "-db", "-f", cfg],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"),
                                     start_new_session=True)
        dp.wait_port(self.http_port, proc=self.proc)

    def info(self) -> dict[str, str]:
        """`show info` from the stats socket."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(b"show info\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return dict(line.split(": ", 1) for line in data.decode().splitlines() if ": " in line)
        return {}


class LbcTls(dp.Lbc):
    """lbc with one https listener, its product defaults otherwise."""

    def __init__(self, work: Path, name: str, port: int, backends: list[int], cert: Path, key: Path) -> None:
        super().__init__(work, name, 1, port, None, backends, pin=True)
        self.cert, self.key = cert, key

    def config(self) -> str:
        lines = ["# Written by bench/tls.py: lbc with its product defaults (TLS: Mozilla intermediate).",
                 "version: 1", self.global_line(), "listeners:",
                 "  - name: web", f'    bind: "{HOST}:{self.http_port}"', "    protocol: https",
                 "    tls:", "      certificates:", f"        - {{cert: {self.cert}, key: {self.key}}}",
                 "    routes:", "      - pool: nginx",
                 "pools:", "  - name: nginx", "    algorithm: round_robin", "    backends:"]
        lines += [f"      - {{id: n{i + 1}, address: {HOST}, port: {p}}}" for i, p in enumerate(self.backends)]
        return "\n".join(lines) + "\n"


class TlsLoad(dp.Load):
    """wrk over https: `keepalive` (realistic headers), `bare`, and `close`
    (a new connection per request); `full` runs openssl s_time."""

    def __init__(self, work: Path, headers: list[str], connections: int, clients: int) -> None:
        super().__init__(work, headers, connections, 10, "")
        self.clients = clients

    def argv(self, port: int, variant: str, seconds: int) -> list[str]:
        cmd = super().argv(port, "realistic" if variant == "keepalive" else "bare", seconds)
        if variant == "close":
            cmd[-1:-1] = ["-H", "Connection: close"]
        cmd[-1] = f"https://{HOST}:{port}/"
        return cmd

    def s_time_argv(self, port: int, seconds: int) -> list[str]:
        return ["taskset", "-c", dp.LOAD_CPU, "openssl", "s_time", "-connect", f"{HOST}:{port}", "-new",
                "-www", "/", "-time", str(seconds)]

    def run(self, setup: dp.Setup, variant: str, seconds: int, rnd: int) -> dp.Run:
        if variant != "full":
            return super().run(setup, variant, seconds, rnd)
        argv = self.s_time_argv(setup.port, seconds)
        before, cpu1_before, t0 = self._cpu(setup), dp.cpu_busy(int(dp.PROXY_CPU)), time.monotonic()
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(self.clients)]
        outs = [p.communicate(timeout=seconds + 60)[0] for p in procs]
        time.sleep(0.3)
        after, cpu1_after, t1 = self._cpu(setup), dp.cpu_busy(int(dp.PROXY_CPU)), time.monotonic()
        connections, real, errors = 0, 0.0, {}
        for p, out in zip(procs, outs, strict=True):
            m = re.search(r"(\d+) connections in ([\d.]+) real seconds, (\d+) bytes read per connection", out)
            if p.returncode != 0 or m is None:
                errors["s_time"] = errors.get("s_time", 0) + 1
                dp.log(f"s_time failed ({p.returncode}): {out[-500:]}")
                continue
            if int(m.group(3)) < 20:  # not even a status line: the request failed
                errors["short"] = errors.get("short", 0) + 1
            connections += int(m.group(1))
            real = max(real, float(m.group(2)))
        user = sum(u - before.get(pid, (0, 0))[0] for pid, (u, _) in after.items())
        system = sum(k - before.get(pid, (0, 0))[1] for pid, (_, k) in after.items())
        cpu = (user + system) / dp.CLK_TCK
        others = max(0.0, 100 * ((cpu1_after - cpu1_before) / dp.CLK_TCK - cpu) / (t1 - t0))
        return dp.Run(setup.name, variant, rnd, connections, real or seconds, cpu, system / dp.CLK_TCK, 0, 0,
                      errors, others)


# -- checks before measuring --------------------------------------------------------------


def verified_get(port: int, ca: Path) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """GET / over TLS 1.3, verifying the certificate for NAME; then again with
    the session of the first connection: (reply, session, resumed)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def once(session=None) -> tuple[bytes, ssl.SSLSocket]:
        raw = socket.create_connection((HOST, port), timeout=5)
        s = ctx.wrap_socket(raw, server_hostname=NAME, session=session)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data, s

    reply, s = once()
    session = s.session  # TLS 1.3: the tickets came with the response
    s.close()
    _, again = once(session)
    resumed = again.session_reused
    again.close()
    return reply, session, resumed


def negotiated(port: int, ca: Path) -> str:
    """What a default OpenSSL client negotiates: version, suite, group."""
    p = subprocess.run(["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", NAME, "-CAfile", str(ca),
                        "-brief", "-alpn", "http/1.1"], input="", capture_output=True, text=True, timeout=10)
    found = {}
    for line in (p.stdout + p.stderr).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Protocol version", "Ciphersuite", "Server Temp Key", "Verification",
                           "Signature type", "ALPN protocol"):
            found[key.strip()] = value.strip()
    return ", ".join(f"{k}: {v}" for k, v in found.items()) or (p.stdout + p.stderr)[-300:]


# -- report -------------------------------------------------------------------------------


def summarize(runs: list[dp.Run]) -> dict[tuple[str, str], dict[str, object]]:
    by: dict[tuple[str, str], list[dp.Run]] = defaultdict(list)
    for r in runs:
        by[(r.setup, r.variant)].append(r)
    out = {}
    for key, rs in by.items():
        per = [r.per_cpu_s for r in rs]
        latency = rs[0].variant != "full"
        out[key] = {
            "n": len(rs),
            "per_cpu_s": dp.median(per),
            "range": (min(per), max(per)) if all(x is not None for x in per) else None,
            "rps": dp.median([r.rps for r in rs]),
            "cpu_pct": dp.median([100 * r.cpu_s / r.seconds for r in rs]),
            "cpu_us": dp.median([r.cpu_us_per_req for r in rs]),
            "sys_us": dp.median([r.sys_us_per_req for r in rs]),
            "p50_ms": dp.median([r.p50_us / 1000 for r in rs]) if latency else None,
            "p99_ms": dp.median([r.p99_us / 1000 for r in rs]) if latency else None,
            "others": dp.median([r.others_cpu1 for r in rs]),
            "errors": sum(sum(r.errors.values()) for r in rs),
        }
    return out


def ratio(s: dict, variant: str, key: str) -> float | None:
    a, b = s.get(("lbc", variant), {}).get(key), s.get(("haproxy", variant), {}).get(key)
    return a / b if a and b else None


def render(meta: dict, summary: dict) -> str:
    L: list[str] = []
    add = L.append
    m = meta["machine"]
    add("# TLS benchmark: lbc vs HAProxy on the same certificate\n")
    add(f"- Date: {meta['date']}")
    add(f"- Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
        f"load average at start {meta['load_start']}, at end {meta['load_end']}")
    add(f"- Command: `{meta['command']}` ({meta['elapsed_min']:.1f} min)")
    add(f"- Code: {meta['code']}")
    add(f"- Tools: {meta['tools']['haproxy']}; {meta['tools']['nginx']}; {meta['tools']['wrk']}; {meta['openssl']}")
    add(f"- Certificate: {meta['certificate']}")
    add("- TLS settings: Mozilla intermediate on both: lbc by its defaults; HAProxy with "
        "`ssl-default-bind-ciphers` (the ECDHE AES-GCM and ChaCha20 suites), `ssl-default-bind-ciphersuites "
        f"{MOZILLA_SUITES}`, `ssl-default-bind-curves X25519:P-256:P-384`, `ssl-default-bind-options "
        "prefer-client-ciphers ssl-min-ver TLSv1.2 no-tls-tickets`, `alpn http/1.1`")
    for name in ("haproxy", "lbc"):
        add(f"- {meta['labels'][name]} negotiates with a default `openssl s_client`: {meta['negotiated'][name]}; "
            f"a TLS 1.3 session resumes: {'yes' if meta['resumes'][name] else 'no'}")
    add(f"- Loads: `{meta['wrk_example']}` (keepalive: plus one `-H` per line of bench/realistic-headers.txt; "
        f"bare: nothing more; close: `-H 'Connection: close'`); full: {meta['clients']} parallel "
        f"`{meta['s_time_example']}`; {meta['rounds']} interleaved rounds, medians shown")
    add(f"- Placement: proxy on CPU {dp.PROXY_CPU} (`taskset -c {dp.PROXY_CPU}`; lbc through "
        f"`taskset -c {dp.PROXY_CPU} lbc up`, 1 worker), wrk, openssl s_time and NGINX (plain HTTP backends) "
        f"on CPU {dp.LOAD_CPU}")
    add("- Figure: requests per proxy CPU-second = requests completed / (utime+stime of the proxy's whole process "
        "tree, from /proc/PID/stat before and after; for lbc supervisord and all its children). In the close and "
        "full loads every request is a new connection, so the figure is also TLS handshakes per proxy CPU-second.")
    if meta.get("haproxy_reuse"):
        add(f"- Resumption in the close load, from HAProxy's session cache counters (`show info`): "
            f"{meta['haproxy_reuse']}")
    add("- Method: bench/METHOD (the workspace's shared/bench/METHOD.md); script: bench/tls.py\n")

    add("## Ratios of the medians (lbc / HAProxy)\n")
    add("| load | per proxy CPU-second | raw rate |")
    add("|---|---:|---:|")
    for v in VARIANTS:
        add(f"| {LABELS[v]} | {dp.fmt(ratio(summary, v, 'per_cpu_s'), '.2f')} | {dp.fmt(ratio(summary, v, 'rps'), '.2f')} |")

    add("\n## Figures (medians)\n")
    add("*others on CPU 1*: the share of the proxy's CPU that other processes of this shared machine used during "
        "the run (/proc/stat), a measure of the noise.\n")
    add("| load | proxy | req / proxy CPU-s | (min-max) | req/s | proxy CPU % | CPU us/req (kernel) | p50 ms | p99 ms "
        "| errors | others on CPU 1 % |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        for name in ("haproxy", "lbc"):
            s = summary.get((name, v))
            if s is None:
                continue
            rng = s["range"]
            us = "-" if s["cpu_us"] is None else f"{s['cpu_us']:.1f} ({s['sys_us']:.1f})"
            add(f"| {v} | {meta['labels'][name]} | {dp.fmt(s['per_cpu_s'])} | "
                f"{dp.fmt(rng[0]) + '-' + dp.fmt(rng[1]) if rng else '-'} | {dp.fmt(s['rps'])} | "
                f"{dp.fmt(s['cpu_pct'], '.0f')} | {us} | {dp.fmt(s['p50_ms'], '.2f')} | {dp.fmt(s['p99_ms'], '.2f')} | "
                f"{s['errors']} | {dp.fmt(s['others'], '.0f')} |")
    add("")
    for note in meta["notes"]:
        add(f"- {note}")
    return "\n".join(L) + "\n"


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3 to write RESULTS-tls.md)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per run")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--clients", type=int, default=4, help="parallel openssl s_time processes (full load)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get missing tools")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    ap.add_argument("--max-minutes", type=float, default=30, help="stop everything and fail after this long")
    args = ap.parse_args(argv)
    if os.cpu_count() < 2:
        raise SystemExit("bench: needs 2 CPUs (proxy on CPU 1, load on CPU 0)")
    if shutil.which("openssl") is None:
        raise SystemExit("bench: needs the openssl command (apt-get install openssl)")

    t_start = time.monotonic()
    meta: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": dp.machine(),
        "load_start": dp.machine()["load"], "rounds": args.rounds, "clients": args.clients, "code": dp.code_version(),
        "command": os.environ.get("LBC_BENCH_COMMAND") or shlex.join([".venv/bin/python", "bench/tls.py", *sys.argv[1:]]),
        "openssl": dp._first_line(["openssl", "version"]),
        "labels": {"haproxy": "HAProxy", "lbc": "lbc (1 worker)"}, "notes": [],
    }
    meta["tools"] = dp.ensure_tools(install=not args.no_install)
    headers = [h.strip() for h in dp.HEADERS_FILE.read_text().splitlines() if h.strip()]

    work = Path(tempfile.mkdtemp(prefix="lbc-bench-tls-"))
    dp.OUT_DIR.mkdir(exist_ok=True)
    out = dp.OUT_DIR / (time.strftime("%Y%m%d-%H%M%S") + "-tls")
    out.mkdir()
    files = make_certificate(work)
    meta["certificate"] = (f"trustme {__import__('trustme').__version__}, ECDSA P-256 leaf for {NAME} signed by "
                           "its CA (ecdsa-with-SHA256), a chain of one; the same files for both proxies "
                           "(HAProxy: chain and key in one PEM)")
    p = dp.free_ports(4)
    backends = p[0:2]
    nginx = dp.Nginx(work, backends)
    haproxy = HaproxyTls(work, p[2], backends, files["combined"])
    lbc = LbcTls(work, "lbc", p[3], backends, files["cert"], files["key"])
    everything = [lbc, haproxy, nginx]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    def on_alarm(signum, frame):
        raise TimeoutError(f"the run took longer than --max-minutes {args.max_minutes:g}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.max_minutes * 60)))
    runs: list[dp.Run] = []
    reuse: list[float] = []
    try:
        dp.log(f"work dir {work}; ports {p}")
        nginx.start()
        haproxy.start()
        lbc.start()
        setups = [dp.Setup("haproxy", haproxy.http_port, haproxy.pids, "HAProxy"),
                  dp.Setup("lbc", lbc.http_port, lbc.pids, "lbc (1 worker)")]
        meta["negotiated"], meta["resumes"] = {}, {}
        for st in setups:
            reply, _, resumed = verified_get(st.port, files["ca"])
            if not reply.startswith(b"HTTP/1.1 200") or not reply.endswith(b"ok\n"):
                raise RuntimeError(f"{st.name}: unexpected reply {reply[:200]!r}")
            meta["negotiated"][st.name] = negotiated(st.port, files["ca"])
            meta["resumes"][st.name] = resumed
            dp.log(f"{st.name}: {meta['negotiated'][st.name]}; resumes: {resumed}")
        load = TlsLoad(work, headers, args.connections, args.clients)
        example = load.argv(setups[0].port, "bare", args.duration)[3:]
        meta["wrk_example"] = shlex.join(Path(a).name if a.endswith(".lua") else a for a in example)
        meta["s_time_example"] = shlex.join(load.s_time_argv(setups[0].port, args.duration)[3:])

        dp.log("warm-up")
        for st in setups:
            for variant in VARIANTS:
                load.run(st, variant, 2, 0)

        dp.log(f"{args.rounds} rounds of about {len(setups) * len(VARIANTS) * args.duration / 60:.1f} min each")
        for rnd in range(1, args.rounds + 1):
            for variant in VARIANTS:
                for st in setups:
                    before = haproxy.info() if st.name == "haproxy" and variant == "close" else None
                    r = load.run(st, variant, args.duration, rnd)
                    if before:
                        after = haproxy.info()
                        conns = int(after.get("CumSslConns", 0)) - int(before.get("CumSslConns", 0))
                        hits = (int(after.get("SslCacheLookups", 0)) - int(after.get("SslCacheMisses", 0))) - \
                               (int(before.get("SslCacheLookups", 0)) - int(before.get("SslCacheMisses", 0)))
                        if conns:
                            reuse.append(100 * hits / conns)
                    runs.append(r)
                    dp.log(f"round {rnd} {variant:9} {st.name:8} {r.rps:9,.0f} req/s  {dp.fmt(r.per_cpu_s):>9} "
                           f"req/CPU-s  CPU {100 * r.cpu_s / r.seconds:3.0f}%"
                           + (f"  p50 {r.p50_us / 1000:.2f} ms  p99 {r.p99_us / 1000:.2f} ms" if r.p50_us else "")
                           + (f"  errors {r.errors}" if r.errors else ""))
    except (KeyboardInterrupt, TimeoutError) as e:
        dp.log(f"{type(e).__name__} {e}; stopping everything")
        raise
    finally:
        signal.alarm(0)
        for thing in everything:
            try:
                thing.stop()
            except Exception as e:  # keep stopping the others
                dp.log(f"stopping {type(thing).__name__}: {e}")
        if args.keep:
            dp.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(runs)
    if reuse:
        meta["haproxy_reuse"] = (f"{dp.median(reuse):.0f}% of HAProxy's handshakes were resumed (median of the "
                                 f"rounds; session cache hits / TLS connections)")
    meta["notes"] = [
        "keepalive and bare: the TLS handshakes happen once per wrk connection (50), so these are the costs of "
        "encrypting and decrypting HTTPS requests and responses plus the proxying, with the backend side in "
        "plain HTTP, pooled.",
        "close: wrk offers the session of the previous connection on each new one; both proxies resume TLS 1.3 "
        "sessions (checked above), so these are mostly resumed handshakes (TLS 1.3 PSK with a fresh ECDHE), "
        "plus one request each.",
        "full: openssl s_time -new never offers a session: every connection is a full handshake (X25519 "
        "key exchange, an ECDSA P-256 signature by the server), plus one HTTP/1.0 request each. s_time runs "
        "one connection at a time per process, so the proxies are not saturated here; the per-CPU-second "
        "figure is the one to compare.",
    ]
    meta["load_end"] = dp.machine()["load"]
    meta["elapsed_min"] = (time.monotonic() - t_start) / 60
    dp.publish(args, out, render(meta, summary), {"meta": meta, "runs": [r.__dict__ for r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
